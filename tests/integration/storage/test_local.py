"""LocalStorage: its files, its signing key and the HTTP endpoints of its signed URLs."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from app.platform.middleware import AuthMiddleware, RequestContextMiddleware
from app.platform.storage import StorageError, create_storage
from app.platform.storage.local import LocalStorage
from app.platform.storage.local_http import content_disposition, parse_range
from app.platform.storage.signing import SIGNING_KEY_FILE, load_or_create_signing_key
from app.settings import Settings
from tests.servers import ROOT, serve_in_thread

# RFC 6266: a quoted ASCII fallback without quotes or backslashes, then the RFC 5987 ext-value.
DISPOSITION = re.compile(
    r"(?P<type>inline|attachment); filename=\"(?P<fallback>[ !#-\[\]-~]*)\"; filename\*=UTF-8''(?P<encoded>[A-Za-z0-9%!#$&+\-.^_`|~]+)"
)


def new_key() -> str:
    return f"user-{secrets.token_hex(6)}/file-{secrets.token_hex(4)}"


def with_query(url: str, **changes: str) -> str:
    """Return the URL with some query parameters replaced."""
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def without_query(url: str, name: str) -> str:
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query, keep_blank_values=True).items() if key != name}
    return urlunsplit(parts._replace(query=urlencode(query)))


async def stored_download_url(storage: LocalStorage, data: bytes = b"0123456789", **options) -> tuple[str, str]:
    key = new_key()
    await storage.put(key, data, content_type=options.pop("content_type", "text/plain"))
    arguments = {"expires_in_seconds": 60, "file_name": "digits.txt", "inline": True, **options}
    return key, await storage.signed_download_url(key, **arguments)


def temporary_files(storage: LocalStorage) -> list[Path]:
    return [path for path in storage.objects_root.rglob("*") if "~tmp." in path.name]


# Files on disk.


async def test_object_file_stays_under_root(local_storage: LocalStorage) -> None:
    key = new_key()

    await local_storage.put(key, b"data", content_type="text/plain")

    files = [path for path in local_storage.root.rglob("*") if path.is_file()]
    assert all(path.resolve().is_relative_to(local_storage.root) for path in files)
    assert temporary_files(local_storage) == []


async def test_symlink_out_of_root_is_not_followed(local_storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret~object").write_bytes(b"x" * 2000)
    (local_storage.objects_root / "evil").symlink_to(outside)

    with pytest.raises(StorageError):
        await local_storage.get("evil/secret")
    with pytest.raises(StorageError):
        await local_storage.put("evil/new", b"x", content_type="text/plain")
    assert not (outside / "new~object").exists()


async def test_invalid_content_type_is_rejected(local_storage: LocalStorage) -> None:
    with pytest.raises(StorageError):
        await local_storage.put(new_key(), b"x", content_type="text/plain\r\nx-evil: 1")


async def test_concurrent_puts_leave_one_whole_object(local_storage: LocalStorage) -> None:
    key = new_key()
    versions = [bytes([index]) * 50_000 for index in range(8)]

    await asyncio.gather(*(local_storage.put(key, data, content_type="application/octet-stream") for data in versions))

    assert await local_storage.get(key) in versions
    assert temporary_files(local_storage) == []


# The signing key.


def test_signing_key_file_is_private(local_storage: LocalStorage) -> None:
    path = local_storage.root / SIGNING_KEY_FILE

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32


def test_processes_starting_together_share_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / SIGNING_KEY_FILE
    keys: list[bytes] = []
    start = threading.Barrier(8)

    def load() -> None:
        start.wait()
        keys.append(load_or_create_signing_key(path))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert [entry.name for entry in path.parent.iterdir()] == [SIGNING_KEY_FILE]


def test_separate_processes_create_one_key(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    script = (
        "import sys, time; from pathlib import Path\n"
        "from app.platform.storage.signing import signing_key_from\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "print(signing_key_from('', Path(sys.argv[1])).hex())\n"
    )
    start_at = str(time.time() + 1.0)
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(directory), start_at], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=60)[0].strip() for process in processes]

    assert all(process.returncode == 0 for process in processes)
    assert len(set(outputs)) == 1
    assert bytes.fromhex(outputs[0]) == (directory / SIGNING_KEY_FILE).read_bytes()


async def test_second_store_on_same_directory_accepts_urls(local_storage: LocalStorage, local_server) -> None:
    key, url = await stored_download_url(local_storage)
    other = LocalStorage(local_storage.root, public_base_url=local_server.base_url)
    local_server.app.router.routes[:] = other.routes()

    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert reply.status_code == 200


def test_configured_signing_key_is_used(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, public_base_url="http://127.0.0.1:1", signing_key="k" * 40)

    assert storage.signing_key == b"k" * 40
    assert not (tmp_path / SIGNING_KEY_FILE).exists()


def test_short_signing_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="STORAGE_SIGNING_KEY"):
        LocalStorage(tmp_path, public_base_url="http://127.0.0.1:1", signing_key="short")


def test_create_storage_picks_local_by_default(tmp_path: Path) -> None:
    settings = Settings(storage_local_dir=tmp_path, public_base_url="https://files.example.com/")

    storage = create_storage(settings)

    assert isinstance(storage, LocalStorage)
    assert storage.public_base_url == "https://files.example.com"


async def test_urls_use_public_base_url(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, public_base_url="https://files.example.com/")
    await storage.put("u/f", b"x", content_type="text/plain")

    url = await storage.signed_download_url("u/f", expires_in_seconds=60, file_name="a.txt", inline=True)

    assert url.startswith("https://files.example.com/storage/v1/local/u/f?")


# Downloads.


async def test_download_headers(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage, content_type="text/html")

    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/html"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["accept-ranges"] == "bytes"
    assert reply.headers["content-length"] == "10"
    assert reply.headers["etag"].startswith('"')
    assert reply.headers["content-disposition"] == "inline; filename=\"digits.txt\"; filename*=UTF-8''digits.txt"
    max_age = int(reply.headers["cache-control"].removeprefix("private, max-age="))
    assert 50 <= max_age <= 60


async def test_download_needs_no_authorization(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url, headers={"authorization": "Bearer not-a-token"})

    assert reply.status_code == 200


async def test_head_returns_headers_without_body(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.head(url)

    assert reply.status_code == 200
    assert reply.content == b""
    assert reply.headers["content-length"] == "10"
    assert reply.headers["content-type"] == "text/plain"


@pytest.mark.parametrize(
    ("range_header", "status", "body", "content_range"),
    [
        ("bytes=2-5", 206, b"2345", "bytes 2-5/10"),
        ("bytes=7-", 206, b"789", "bytes 7-9/10"),
        ("bytes=-3", 206, b"789", "bytes 7-9/10"),
        ("bytes=-30", 206, b"0123456789", "bytes 0-9/10"),
        ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
        ("bytes=0-0", 206, b"0", "bytes 0-0/10"),
        ("bytes=0-1,4-5", 200, b"0123456789", None),
        ("bytes=5-2", 200, b"0123456789", None),
        ("items=0-1", 200, b"0123456789", None),
        ("bytes=x-1", 200, b"0123456789", None),
        # Numbers longer than any file size, and leading zeros, which do not make a number large.
        ("bytes=" + "0" * 5000 + "2-5", 206, b"2345", "bytes 2-5/10"),
        ("bytes=2-" + "9" * 5000, 206, b"23456789", "bytes 2-9/10"),
        ("bytes=-" + "9" * 5000, 206, b"0123456789", "bytes 0-9/10"),
        ("bytes=2-" + "9" * 19, 206, b"23456789", "bytes 2-9/10"),
        ("bytes=2-" + "9" * 18, 206, b"23456789", "bytes 2-9/10"),
        # Malformed values are ignored.
        ("bytes=²-5", 200, b"0123456789", None),
        ("bytes=+1-5", 200, b"0123456789", None),
        ("bytes=1e3-", 200, b"0123456789", None),
        ("bytes=0x1-5", 200, b"0123456789", None),
        ("bytes=1-2-3", 200, b"0123456789", None),
        ("bytes=--5", 200, b"0123456789", None),
        ("bytes=-", 200, b"0123456789", None),
        ("bytes=", 200, b"0123456789", None),
        ("bytes", 200, b"0123456789", None),
        ("=0-1", 200, b"0123456789", None),
        ("bytes=1 -5", 200, b"0123456789", None),
        ("bytes=0-1," + "9" * 5000 + "-", 200, b"0123456789", None),
        ("BYTES = 2-5", 206, b"2345", "bytes 2-5/10"),
    ],
)
async def test_range_requests(local_storage: LocalStorage, range_header: str, status: int, body: bytes, content_range) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url, headers={"range": range_header.encode("latin-1")})

    assert reply.status_code == status
    assert reply.content == body
    assert reply.headers.get("content-range") == content_range


@pytest.mark.parametrize("range_header", ["bytes=²-5", "bytes=١-٥", "bytes=0-٥", "bytes=-𝟓"])
def test_range_with_non_ascii_digits_is_ignored(range_header: str) -> None:
    # Over HTTP these arrive as Latin-1 characters, so only a direct call exercises them.
    assert parse_range(range_header, 10) is None


@pytest.mark.parametrize(
    "range_header",
    ["bytes=10-", "bytes=100-200", "bytes=-0", "bytes=" + "9" * 5000 + "-", "bytes=" + "9" * 19 + "-" + "9" * 20, "bytes=-" + "0" * 5000],
)
async def test_unsatisfiable_range_returns_416(local_storage: LocalStorage, range_header: str) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url, headers={"range": range_header})

    assert reply.status_code == 416
    assert reply.headers["content-range"] == "bytes */10"


async def test_range_on_empty_object_returns_416(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage, data=b"")

    async with httpx.AsyncClient() as client:
        reply = await client.get(url, headers={"range": "bytes=-5"})

    assert reply.status_code == 416
    assert reply.headers["content-range"] == "bytes */0"


async def test_if_range_with_other_etag_sends_whole_object(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url, headers={"range": "bytes=2-5", "if-range": '"other"'})

    assert reply.status_code == 200
    assert reply.content == b"0123456789"


async def test_matching_etag_returns_304(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        etag = (await client.get(url)).headers["etag"]
        reply = await client.get(url, headers={"if-none-match": etag})

    assert reply.status_code == 304
    assert reply.content == b""


async def test_large_object_streams_whole(local_storage: LocalStorage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    _, url = await stored_download_url(local_storage, data=data, content_type="application/octet-stream")

    async with httpx.AsyncClient() as client:
        whole = await client.get(url)
        tail = await client.get(url, headers={"range": f"bytes={len(data) - 100_000}-"})

    assert whole.content == data
    assert tail.content == data[-100_000:]


async def test_download_in_progress_survives_replacement(local_storage: LocalStorage) -> None:
    # Several times a typical loopback socket buffer, so the server is likely still reading the file.
    old = os.urandom(16 * 1024 * 1024)
    key, url = await stored_download_url(local_storage, data=old, content_type="application/octet-stream")

    async with httpx.AsyncClient() as client, client.stream("GET", url) as reply:
        chunks = reply.aiter_raw()
        received = bytearray(await anext(chunks))
        await local_storage.put(key, b"new version", content_type="text/plain")
        async for chunk in chunks:
            received += chunk

    assert bytes(received) == old
    assert await local_storage.get(key) == b"new version"


def open_files_under(directory: Path) -> list[str]:
    """Return the files under `directory` that this process has open."""
    targets = []
    for descriptor in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith(str(directory)):
            targets.append(target)
    return targets


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
async def test_abandoned_download_closes_file(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage, data=os.urandom(16 * 1024 * 1024), content_type="application/octet-stream")

    async with httpx.AsyncClient() as client, client.stream("GET", url) as reply:
        await anext(reply.aiter_raw())
    for _ in range(50):
        if not open_files_under(local_storage.objects_root):
            break
        await asyncio.sleep(0.05)

    assert open_files_under(local_storage.objects_root) == []


async def test_deleted_object_returns_404(local_storage: LocalStorage) -> None:
    key, url = await stored_download_url(local_storage)
    await local_storage.delete([key])

    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert reply.status_code == 404
    assert reply.json() == {"error": "not found"}


async def test_expired_url_returns_403(local_storage: LocalStorage) -> None:
    _, url = await stored_download_url(local_storage, expires_in_seconds=-1)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert reply.status_code == 403
    assert reply.json() == {"error": "expired"}


@pytest.mark.parametrize(
    "changes",
    [
        {"expires": str(int(time.time()) + 3600)},
        {"name": "other.txt"},
        {"disposition": "attachment"},
        {"signature": "A" * 43},
        {"signature": ""},
    ],
)
async def test_tampered_download_url_returns_403(local_storage: LocalStorage, changes: dict[str, str]) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.get(with_query(url, **changes))

    assert reply.status_code == 403
    assert set(reply.json()) == {"error"}


async def test_url_of_one_key_does_not_open_another(local_storage: LocalStorage) -> None:
    key, url = await stored_download_url(local_storage)
    other_key, _ = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url.replace(key, other_key))

    assert reply.status_code == 403


@pytest.mark.parametrize("parameter", ["expires", "name", "disposition", "signature"])
async def test_download_without_parameter_returns_403(local_storage: LocalStorage, parameter: str) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.get(without_query(url, parameter))

    assert reply.status_code == 403


@pytest.mark.parametrize("path", ["u/%2E%2E/x", "%2E%2E/%2E%2E/etc/passwd", "u/a%5Cb", "u/a%00b", "u//x", "u/%C3%BC"])
async def test_invalid_key_in_path_returns_400(local_storage: LocalStorage, local_server, path: str) -> None:
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{local_server.base_url}/storage/v1/local/{path}?expires=1&name=a&disposition=inline&signature=x")

    assert reply.status_code == 400
    assert reply.json() == {"error": "invalid key"}


async def test_raw_dot_segments_are_rejected(local_storage: LocalStorage, local_server) -> None:
    # httpx removes literal dot segments, so this request goes out on a bare socket.
    address = urlsplit(local_server.base_url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(b"GET /storage/v1/local/u/../../x?expires=1&name=a&disposition=inline&signature=x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b'{"error":"invalid key"}' in reply


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_download_url_with_other_method_is_rejected(local_storage: LocalStorage, method: str) -> None:
    _, url = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        reply = await client.request(method, url, content=b"x", headers={"content-type": "text/plain"})

    assert reply.status_code == (403 if method == "PUT" else 405)
    assert await local_storage.get(urlsplit(url).path.removeprefix("/storage/v1/local/")) == b"0123456789"


@pytest.mark.parametrize(
    ("file_name", "expected_name", "expected_fallback"),
    [
        ("report.pdf", "report.pdf", "report.pdf"),
        ('say "hi".txt', 'say "hi".txt', "say _hi_.txt"),
        ("a;b=c.txt", "a;b=c.txt", "a;b=c.txt"),
        ("line\r\nbreak\x00.txt", "linebreak.txt", "linebreak.txt"),
        ("back\\slash.txt", "back_slash.txt", "back_slash.txt"),
        ("résumé.pdf", "résumé.pdf", "resume.pdf"),
        ("😀 party.png", "😀 party.png", "_ party.png"),
        ("../x", ".._x", ".._x"),
        ("100%.txt", "100%.txt", "100_.txt"),
        ("evil\u202egnp.exe", "evilgnp.exe", "evilgnp.exe"),
        ("in\u200bvisible.txt", "invisible.txt", "invisible.txt"),
        ("arabic\u061cmark.txt", "arabicmark.txt", "arabicmark.txt"),
        ("\ufeffbom.txt", "bom.txt", "bom.txt"),
        ("soft\u00adhyphen.txt", "softhyphen.txt", "softhyphen.txt"),
        ("tag\U000e0041.txt", "tag.txt", "tag.txt"),
        ("line\u2028break.txt", "linebreak.txt", "linebreak.txt"),
        ("private\ue000use.txt", "privateuse.txt", "privateuse.txt"),
        ("blank\u3164\u2800.txt", "blank.txt", "blank.txt"),
        ("no\u00a0break\u3000space.txt", "no break space.txt", "no break space.txt"),
        ("\u200b\u200d\u2060", "download", "download"),
        ("", "download", "download"),
        ("\r\n", "download", "download"),
    ],
)
async def test_content_disposition_survives_any_name(
    local_storage: LocalStorage, file_name: str, expected_name: str, expected_fallback: str
) -> None:
    _, url = await stored_download_url(local_storage, file_name=file_name, inline=False)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    header = reply.headers["content-disposition"]
    parsed = DISPOSITION.fullmatch(header)
    assert reply.status_code == 200
    assert parsed is not None, header
    assert parsed["type"] == "attachment"
    assert unquote(parsed["encoded"], errors="strict") == expected_name
    assert parsed["fallback"] == expected_fallback


def test_long_file_name_keeps_extension() -> None:
    header = content_disposition("x" * 5000 + ".pdf", inline=True)
    parsed = DISPOSITION.fullmatch(header)

    assert parsed is not None
    name = unquote(parsed["encoded"])
    assert len(name) == 200
    assert name.endswith("x.pdf")
    assert len(header) < 1000


def test_long_emoji_name_stays_bounded() -> None:
    header = content_disposition("😀" * 5000, inline=False)

    assert header.isascii()
    assert len(header) < 3000


# Uploads.


async def put_to(url: str, data: bytes, content_type: str | None = "text/plain", **headers: str) -> httpx.Response:
    if content_type is not None:
        headers["content-type"] = content_type
    async with httpx.AsyncClient() as client:
        return await client.put(url, content=data, headers=headers)


async def test_upload_returns_key_and_size(local_storage: LocalStorage) -> None:
    key = new_key()
    url = await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)

    reply = await put_to(url, b"hello")

    assert reply.status_code == 200
    assert reply.json() == {"key": key, "size": 5}
    assert await local_storage.get(key) == b"hello"


async def test_upload_of_exactly_max_bytes_is_accepted(local_storage: LocalStorage) -> None:
    key = new_key()
    url = await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)

    reply = await put_to(url, b"x" * 100)

    assert reply.status_code == 200


async def test_upload_with_declared_length_over_max_returns_413(local_storage: LocalStorage) -> None:
    key = new_key()
    url = await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)

    reply = await put_to(url, b"x" * 101)

    assert reply.status_code == 413
    assert await local_storage.list_keys(key.split("/")[0]) == []


async def test_streamed_upload_over_max_stops_before_body_ends(local_storage: LocalStorage) -> None:
    key = new_key()
    url = urlsplit(await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=1000))
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"x" * 600
    for _ in range(2):
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await writer.drain()

    # The body has not ended (no last chunk was sent), yet the reply arrives.
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()

    assert status_line.startswith(b"HTTP/1.1 413 ")
    await asyncio.sleep(0.1)
    assert await local_storage.list_keys(key.split("/")[0]) == []
    assert temporary_files(local_storage) == []


@pytest.mark.parametrize("content_type", ["image/png", "text/plain;charset=UTF-8", None])
async def test_upload_with_other_content_type_returns_415(local_storage: LocalStorage, content_type) -> None:
    key = new_key()
    url = await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)

    reply = await put_to(url, b"hello", content_type=content_type)

    assert reply.status_code == 415
    assert reply.json() == {"error": "content type must be text/plain"}


async def test_upload_content_type_ignores_case(local_storage: LocalStorage) -> None:
    key = new_key()
    url = await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)

    reply = await put_to(url, b"hello", content_type="Text/Plain")

    assert reply.status_code == 200
    assert (await local_storage.info(key)).content_type == "text/plain"


@pytest.mark.parametrize(
    "changes",
    [
        {"content_type": "text/html"},
        {"max_bytes": "1000000"},
        {"expires": str(int(time.time()) + 3600)},
        {"signature": "A" * 43},
    ],
)
async def test_tampered_upload_url_returns_403(local_storage: LocalStorage, changes: dict[str, str]) -> None:
    key = new_key()
    url = await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)

    reply = await put_to(with_query(url, **changes), b"hello", content_type=changes.get("content_type", "text/plain"))

    assert reply.status_code == 403
    assert reply.json() == {"error": "invalid signature"}


async def test_expired_upload_url_returns_403(local_storage: LocalStorage) -> None:
    url = await local_storage.signed_upload_url(new_key(), expires_in_seconds=-1, content_type="text/plain", max_bytes=100)

    reply = await put_to(url, b"hello")

    assert reply.status_code == 403
    assert reply.json() == {"error": "expired"}


async def test_upload_url_does_not_download(local_storage: LocalStorage) -> None:
    key = new_key()
    await local_storage.put(key, b"secret", content_type="text/plain")
    url = await local_storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert reply.status_code == 403
    assert b"secret" not in reply.content


# Behind the service's middleware.


async def test_access_log_omits_signature(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = Starlette(middleware=[Middleware(RequestContextMiddleware), Middleware(AuthMiddleware, verifier=None)])
    with serve_in_thread(app) as address:
        storage = LocalStorage(tmp_path, public_base_url=f"http://{address}")
        app.router.routes[:] = storage.routes()
        _, url = await stored_download_url(storage)
        signature = parse_qs(urlsplit(url).query)["signature"][0]

        with caplog.at_level(logging.INFO, logger="app.access"):
            async with httpx.AsyncClient() as client:
                reply = await client.get(url)

    assert reply.status_code == 200
    access_lines = [record for record in caplog.records if record.name == "app.access"]
    assert access_lines
    assert all(signature not in record.getMessage() for record in access_lines)
    assert all(signature not in str(record.__dict__) for record in access_lines)
