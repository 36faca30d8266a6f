"""LocalStorage under stress: slow and concurrent transfers, the upload gate, disk failures, leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from app.platform.storage import ObjectNotFound, StorageUnavailable, local_http
from app.platform.storage.local import LocalStorage
from app.platform.storage.signing import SIGNING_KEY_FILE
from tests.integration.storage.test_local import (
    new_key,
    open_files_under,
    put_to,
    stored_download_url,
    temporary_files,
)


async def upload_url(storage: LocalStorage, key: str, max_bytes: int = 1000) -> str:
    return await storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=max_bytes)


class SlowUpload:
    """A PUT on a bare socket that declares a body and sends only part of it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def start(cls, url: str, *, declared: int = 1000, sent: bytes = b"x") -> SlowUpload:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {declared}\r\n\r\n".encode()
            + sent
        )
        await writer.drain()
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def status_line(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), timeout)

    def close(self) -> None:
        self.writer.close()


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def wait_for_503(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """Send GETs until one gets 503, because slow uploads take their slots a moment after connecting."""
    deadline = time.monotonic() + 5.0
    while True:
        reply = await client.get(url)
        if reply.status_code == 503 or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.02)


async def get_once_free(client: httpx.AsyncClient, url: str, method: str = "GET", **options) -> httpx.Response:
    """Send a request, repeating it while it gets 503 for up to 2 seconds.

    A transfer returns its slot just after its last byte is sent, so a client can finish reading
    a reply and send its next request before the slot is free again.
    """
    deadline = time.monotonic() + 2.0
    while True:
        reply = await client.request(method, url, **options)
        if reply.status_code != 503 or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.02)


# A bounded number of transfers.


async def test_transfers_past_limit_get_503(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "MAX_CONCURRENT_TRANSFERS", 4)
    _, download = await stored_download_url(local_storage)
    slow = [await SlowUpload.start(await upload_url(local_storage, new_key())) for _ in range(4)]

    async with httpx.AsyncClient() as client:
        started = time.monotonic()
        reply = await wait_for_503(client, download)
        upload = await put_to(await upload_url(local_storage, new_key()), b"hello")

    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.json() == {"error": "too many transfers in progress: at most 4, try again later"}
    assert upload.status_code == 503
    assert time.monotonic() - started < 5.0
    for upload_in_progress in slow:
        upload_in_progress.close()


async def test_slots_return_after_uploads_end(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "MAX_CONCURRENT_TRANSFERS", 2)
    slow = [await SlowUpload.start(await upload_url(local_storage, new_key())) for _ in range(2)]
    _, download = await stored_download_url(local_storage)
    async with httpx.AsyncClient() as client:
        assert (await wait_for_503(client, download)).status_code == 503

    for upload_in_progress in slow:
        upload_in_progress.close()
    await wait_until(lambda: temporary_files(local_storage) == [])
    async with httpx.AsyncClient() as client:
        replies = [await get_once_free(client, download) for _ in range(5)]

    assert [reply.status_code for reply in replies] == [200] * 5


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_finished_downloads_return_slots(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setattr(local_http, "MAX_CONCURRENT_TRANSFERS", 1)
    key, download = await stored_download_url(local_storage)

    async with httpx.AsyncClient() as client:
        statuses = [(await get_once_free(client, download, method)).status_code for _ in range(3)]
        etag = (await get_once_free(client, download)).headers["etag"]
        not_modified = await get_once_free(client, download, headers={"if-none-match": etag})
        unsatisfiable = await get_once_free(client, download, headers={"range": "bytes=50-"})
        await local_storage.delete([key])
        missing = await get_once_free(client, download)
        after = await get_once_free(client, (await stored_download_url(local_storage))[1])

    assert statuses == [200, 200, 200]
    assert not_modified.status_code == 304
    assert unsatisfiable.status_code == 416
    assert missing.status_code == 404
    assert after.status_code == 200


async def test_stalled_download_returns_slot(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "MAX_CONCURRENT_TRANSFERS", 1)
    monkeypatch.setattr(local_http, "BODY_IDLE_TIMEOUT_SECONDS", 0.5)
    # Far more than the socket buffers hold, so the server's sends wait for a client that reads nothing.
    _, large = await stored_download_url(local_storage, data=os.urandom(64 * 1024 * 1024), content_type="application/octet-stream")
    _, small = await stored_download_url(local_storage)
    parts = urlsplit(large)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()

    async with httpx.AsyncClient() as client:
        busy = await wait_for_503(client, small)
        await wait_until(lambda: open_files_under(local_storage.objects_root) == [], timeout=10)
        after = await get_once_free(client, small)
    writer.close()

    assert busy.status_code == 503
    assert after.status_code == 200


async def test_many_slow_uploads_are_bounded(local_storage: LocalStorage) -> None:
    # The reported attack: more slow PUTs than the limit, each declaring 1000 bytes and sending 1.
    count = local_http.MAX_CONCURRENT_TRANSFERS + 16
    slow = [await SlowUpload.start(await upload_url(local_storage, new_key())) for _ in range(count)]

    # The server may take the connections in any order, so count replies rather than pick them.
    status_lines = await asyncio.gather(*(status_line_or_none(upload) for upload in slow))
    in_progress = len(temporary_files(local_storage))
    for upload in slow:
        upload.close()

    rejected = [line for line in status_lines if line is not None]
    assert len(rejected) == 16
    assert all(line.startswith(b"HTTP/1.1 503 ") for line in rejected)
    assert in_progress == local_http.MAX_CONCURRENT_TRANSFERS
    await wait_until(lambda: temporary_files(local_storage) == [])


async def status_line_or_none(upload: SlowUpload, timeout: float = 3) -> bytes | None:
    try:
        return await upload.status_line(timeout=timeout)
    except TimeoutError:
        return None


# Transfers per owner.


def key_of(owner: str) -> str:
    return f"{owner}/file-{secrets.token_hex(4)}"


async def test_trickling_owner_leaves_slots_to_others(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    # The reported attack, scaled down: one owner opens more slow PUTs than the whole process
    # allows and sends a byte now and then into each.
    monkeypatch.setattr(local_http, "MAX_CONCURRENT_TRANSFERS", 8)
    attacker = f"user-{secrets.token_hex(6)}"
    slow = [await SlowUpload.start(await upload_url(local_storage, key_of(attacker))) for _ in range(10)]
    status_lines = await asyncio.gather(*(status_line_or_none(upload) for upload in slow))
    for upload in slow:
        with contextlib.suppress(ConnectionError):
            await upload.send(b"x")

    _, download = await stored_download_url(local_storage)
    other_key = new_key()
    other_upload = await put_to(await upload_url(local_storage, other_key), b"hello")
    async with httpx.AsyncClient() as client:
        other_download = await client.get(download)
    in_progress = len(temporary_files(local_storage))
    for upload in slow:
        upload.close()

    rejected = [line for line in status_lines if line is not None]
    assert len(rejected) == 10 - local_http.MAX_TRANSFERS_PER_OWNER
    assert all(line.startswith(b"HTTP/1.1 503 ") for line in rejected)
    assert in_progress == local_http.MAX_TRANSFERS_PER_OWNER
    assert other_upload.status_code == 200
    assert await local_storage.get(other_key) == b"hello"
    assert other_download.status_code == 200
    assert other_download.content == b"0123456789"


async def test_transfers_past_owner_limit_get_503(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "MAX_TRANSFERS_PER_OWNER", 2)
    owner = f"user-{secrets.token_hex(6)}"
    stored_key = key_of(owner)
    await local_storage.put(stored_key, b"data", content_type="text/plain")
    download = await local_storage.signed_download_url(stored_key, expires_in_seconds=60, file_name="a.txt", inline=True)
    slow = [await SlowUpload.start(await upload_url(local_storage, key_of(owner))) for _ in range(2)]
    await wait_until(lambda: len(temporary_files(local_storage)) == 2)

    started = time.monotonic()
    upload = await put_to(await upload_url(local_storage, key_of(owner)), b"hello")
    async with httpx.AsyncClient() as client:
        got = await client.get(download)
    elapsed = time.monotonic() - started
    for upload_in_progress in slow:
        upload_in_progress.close()

    message = "too many transfers in progress for the owner of this key: at most 2, try again once one has finished"
    assert upload.status_code == 503
    assert upload.headers["retry-after"] == "1"
    assert upload.json() == {"error": message}
    assert got.status_code == 503
    assert got.json() == {"error": message}
    assert elapsed < 5.0


async def test_owner_slots_return_after_uploads_end(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "MAX_TRANSFERS_PER_OWNER", 1)
    owner = f"user-{secrets.token_hex(6)}"
    slow = await SlowUpload.start(await upload_url(local_storage, key_of(owner)))
    await wait_until(lambda: len(temporary_files(local_storage)) == 1)
    busy = await put_to(await upload_url(local_storage, key_of(owner)), b"hello")

    slow.close()
    await wait_until(lambda: temporary_files(local_storage) == [])
    accepted = await put_to(await upload_url(local_storage, key_of(owner)), b"hello")

    assert busy.status_code == 503
    assert accepted.status_code == 200


# Stalled bodies.


async def test_stalled_upload_gets_408(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "BODY_IDLE_TIMEOUT_SECONDS", 0.3)
    key = new_key()
    upload = await SlowUpload.start(await upload_url(local_storage, key))

    status_line = await upload.status_line()
    body = await asyncio.wait_for(upload.reader.read(), 5)
    upload.close()

    assert status_line.startswith(b"HTTP/1.1 408 ")
    assert body.endswith(b'{"error":"no body bytes arrived for 0.3 seconds"}')
    assert temporary_files(local_storage) == []
    assert await local_storage.list_keys(key.split("/")[0]) == []


async def test_stalled_upload_without_body_gets_408(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "BODY_IDLE_TIMEOUT_SECONDS", 0.3)
    upload = await SlowUpload.start(await upload_url(local_storage, new_key()), sent=b"")

    status_line = await upload.status_line()
    upload.close()

    assert status_line.startswith(b"HTTP/1.1 408 ")


async def test_trickled_upload_gets_408_at_time_limit(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "MIN_TRANSFER_SECONDS", 0.5)
    monkeypatch.setattr(local_http, "MIN_TRANSFER_BYTES_PER_SECOND", 10**9)
    key = new_key()
    upload = await SlowUpload.start(await upload_url(local_storage, key))
    started = time.monotonic()

    # Each byte arrives well inside the idle timeout of 15 seconds.
    status_line = None
    while status_line is None and time.monotonic() - started < 10:
        with contextlib.suppress(ConnectionError):
            await upload.send(b"x")
        status_line = await status_line_or_none(upload, timeout=0.1)
    # The server may keep the connection open, so read up to the end of the JSON body.
    body = await asyncio.wait_for(upload.reader.readuntil(b"}"), 5)
    upload.close()

    assert status_line is not None
    assert status_line.startswith(b"HTTP/1.1 408 ")
    assert body.endswith(b'{"error":"the body did not arrive within 0.5 seconds"}')
    assert time.monotonic() - started < 10
    await wait_until(lambda: temporary_files(local_storage) == [])
    assert await local_storage.list_keys(key.split("/")[0]) == []


async def test_upload_must_finish_before_url_expiry(local_storage: LocalStorage) -> None:
    key = new_key()
    url = await local_storage.signed_upload_url(key, expires_in_seconds=2, content_type="text/plain", max_bytes=1000)
    upload = await SlowUpload.start(url)
    started = time.monotonic()

    status_line = None
    while status_line is None and time.monotonic() - started < 10:
        with contextlib.suppress(ConnectionError):
            await upload.send(b"x")
        status_line = await status_line_or_none(upload, timeout=0.2)
    # The server may keep the connection open, so read up to the end of the JSON body.
    body = await asyncio.wait_for(upload.reader.readuntil(b"}"), 5)
    upload.close()

    assert status_line is not None
    assert status_line.startswith(b"HTTP/1.1 408 ")
    assert body.endswith(b'{"error":"the upload URL expired before the body was complete"}')
    await wait_until(lambda: temporary_files(local_storage) == [])


async def test_slow_reading_download_ends_at_time_limit(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "MAX_CONCURRENT_TRANSFERS", 1)
    monkeypatch.setattr(local_http, "MIN_TRANSFER_SECONDS", 0.5)
    monkeypatch.setattr(local_http, "MIN_TRANSFER_BYTES_PER_SECOND", 10**12)
    size = 64 * 1024 * 1024
    _, large = await stored_download_url(local_storage, data=os.urandom(size), content_type="application/octet-stream")
    _, small = await stored_download_url(local_storage)
    parts = urlsplit(large)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()

    # A client that reads a little every 50 ms never trips the idle timeout of 15 seconds.
    received = 0

    async def read_slowly() -> None:
        nonlocal received
        while data := await reader.read(64 * 1024):
            received += len(data)
            await asyncio.sleep(0.05)

    reading = asyncio.create_task(read_slowly())
    await wait_until(lambda: received > 0)
    await wait_until(lambda: open_files_under(local_storage.objects_root) == [], timeout=10)
    async with httpx.AsyncClient() as client:
        after = await get_once_free(client, small)
    reading.cancel()
    writer.close()

    assert received < size
    assert after.status_code == 200


async def test_headers_alone_open_no_file(local_storage: LocalStorage) -> None:
    upload = await SlowUpload.start(await upload_url(local_storage, new_key()), sent=b"")
    await asyncio.sleep(0.3)

    temporaries = temporary_files(local_storage)
    open_files = open_files_under(local_storage.objects_root)
    upload.close()

    assert temporaries == []
    assert open_files == []


async def test_slow_upload_that_finishes_is_stored(local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_http, "BODY_IDLE_TIMEOUT_SECONDS", 1.0)
    key = new_key()
    upload = await SlowUpload.start(await upload_url(local_storage, key), declared=4, sent=b"a")

    for byte in (b"b", b"c", b"d"):
        await asyncio.sleep(0.3)
        await upload.send(byte)
    status_line = await upload.status_line()
    upload.close()

    assert status_line.startswith(b"HTTP/1.1 200 ")
    assert await local_storage.get(key) == b"abcd"


# One upload per key.


async def test_second_upload_of_same_key_gets_409(local_storage: LocalStorage) -> None:
    key = new_key()
    url = await upload_url(local_storage, key)
    first = await SlowUpload.start(url, declared=5, sent=b"h")
    await wait_until(lambda: len(temporary_files(local_storage)) == 1)

    second = await put_to(url, b"other")
    await first.send(b"ello")
    first_status = await first.status_line()
    first.close()

    assert second.status_code == 409
    assert second.json() == {"error": "another upload to this URL is in progress"}
    assert first_status.startswith(b"HTTP/1.1 200 ")
    assert await local_storage.get(key) == b"hello"


async def test_key_is_free_after_failed_upload(local_storage: LocalStorage) -> None:
    key = new_key()
    url = await upload_url(local_storage, key, max_bytes=5)

    too_long = await put_to(url, b"x" * 6)
    accepted = await put_to(url, b"hello")

    assert too_long.status_code == 413
    assert accepted.status_code == 200


# The upload gate.


class RecordingGate:
    """An upload gate that returns the given results in turn, raising those that are exceptions.

    It records each key it is called with.
    """

    def __init__(self, *results: bool | Exception) -> None:
        self.results = list(results)
        self.keys: list[str] = []

    async def __call__(self, key: str) -> bool:
        self.keys.append(key)
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


async def test_gate_is_asked_twice_per_upload(local_storage: LocalStorage) -> None:
    key = new_key()
    local_storage.upload_gate = gate = RecordingGate(True, True)

    reply = await put_to(await upload_url(local_storage, key), b"hello")

    assert reply.status_code == 200
    assert gate.keys == [key, key]


@pytest.mark.parametrize("results", [(False,), (True, False)], ids=["before-body", "before-link"])
async def test_gate_refusal_returns_410(local_storage: LocalStorage, results: tuple[bool, ...]) -> None:
    key = new_key()
    local_storage.upload_gate = RecordingGate(*results)

    reply = await put_to(await upload_url(local_storage, key), b"hello")

    assert reply.status_code == 410
    assert reply.json() == {"error": "this upload is no longer accepted"}
    assert await local_storage.list_keys(key.split("/")[0]) == []
    assert temporary_files(local_storage) == []


@pytest.mark.parametrize("results", [(RuntimeError("db password=hunter2"),), (True, OSError("disk"))])
async def test_gate_failure_returns_503(
    local_storage: LocalStorage, caplog: pytest.LogCaptureFixture, results: tuple[object, ...]
) -> None:
    key = new_key()
    local_storage.upload_gate = RecordingGate(*results)

    with caplog.at_level(logging.INFO, logger=local_http.__name__):
        reply = await put_to(await upload_url(local_storage, key), b"hello")

    gate_lines = [record for record in caplog.records if record.getMessage() == "upload gate failed"]
    assert reply.status_code == 503
    assert reply.json() == {"error": "upload check unavailable"}
    assert "hunter2" not in reply.text
    assert len(gate_lines) == 1
    assert gate_lines[0].exc_info is None
    assert await local_storage.list_keys(key.split("/")[0]) == []
    assert temporary_files(local_storage) == []


def test_gate_is_a_constructor_argument(tmp_path: Path) -> None:
    gate = RecordingGate()

    storage = LocalStorage(tmp_path, public_base_url="http://127.0.0.1:1", upload_gate=gate)

    assert storage.upload_gate is gate


# Disk failures.


def remove_objects_root(storage: LocalStorage) -> None:
    shutil.rmtree(storage.objects_root)


def replace_objects_root_with_file(storage: LocalStorage) -> None:
    shutil.rmtree(storage.objects_root)
    storage.objects_root.write_bytes(b"not a directory")


def replace_objects_root_with_symlink(storage: LocalStorage) -> None:
    shutil.rmtree(storage.objects_root)
    target = storage.root / "elsewhere"
    target.mkdir()
    storage.objects_root.symlink_to(target)


BREAKAGES = [remove_objects_root, replace_objects_root_with_file, replace_objects_root_with_symlink]


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("operation", ["put", "get", "info", "delete", "list_keys", "signed_download_url"])
async def test_broken_objects_root_is_unavailable(local_storage: LocalStorage, breakage, operation: str) -> None:
    key = new_key()
    await local_storage.put(key, b"data", content_type="text/plain")
    breakage(local_storage)
    calls = {
        "put": lambda: local_storage.put(new_key(), b"x", content_type="text/plain"),
        "get": lambda: local_storage.get(key),
        "info": lambda: local_storage.info(key),
        "delete": lambda: local_storage.delete([key]),
        "list_keys": lambda: local_storage.list_keys(key.split("/")[0]),
        "signed_download_url": lambda: local_storage.signed_download_url(
            key, expires_in_seconds=60, file_name="a.txt", inline=True
        ),
    }

    with pytest.raises(StorageUnavailable):
        await calls[operation]()
    assert not (local_storage.root / "elsewhere").exists() or list((local_storage.root / "elsewhere").iterdir()) == []


async def test_missing_objects_root_is_not_recreated(local_storage: LocalStorage) -> None:
    remove_objects_root(local_storage)

    with pytest.raises(StorageUnavailable):
        await local_storage.put(new_key(), b"x", content_type="text/plain")

    assert not local_storage.objects_root.exists()


async def test_missing_object_is_still_not_found(local_storage: LocalStorage) -> None:
    with pytest.raises(ObjectNotFound):
        await local_storage.get(new_key())
    assert await local_storage.list_keys("nobody") == []
    await local_storage.delete([new_key()])


async def test_directory_in_place_of_object_is_unavailable(local_storage: LocalStorage) -> None:
    key = new_key()
    (local_storage.objects_root / f"{key}~object").mkdir(parents=True)

    with pytest.raises(StorageUnavailable):
        await local_storage.get(key)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
async def test_unreadable_object_is_unavailable(local_storage: LocalStorage) -> None:
    key = new_key()
    await local_storage.put(key, b"data", content_type="text/plain")
    path = local_storage.object_path(key)
    path.chmod(0)

    try:
        with pytest.raises(StorageUnavailable):
            await local_storage.get(key)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("breakage", BREAKAGES)
async def test_http_routes_report_broken_root_as_503(
    local_storage: LocalStorage, caplog: pytest.LogCaptureFixture, breakage
) -> None:
    _, download = await stored_download_url(local_storage)
    upload = await upload_url(local_storage, new_key())
    breakage(local_storage)

    with caplog.at_level(logging.INFO, logger=local_http.__name__):
        async with httpx.AsyncClient() as client:
            got = await client.get(download)
        put = await put_to(upload, b"hello")

    failures = [record for record in caplog.records if record.getMessage() == "local storage failed"]
    assert got.status_code == 503
    assert got.json() == {"error": "storage unavailable"}
    assert got.headers["retry-after"] == "1"
    assert put.status_code == 503
    assert put.json() == {"error": "storage unavailable"}
    assert len(failures) == 2
    assert all(record.exc_info is None for record in failures)


async def test_deleted_signing_key_file_keeps_loaded_key(local_storage: LocalStorage) -> None:
    key_file = local_storage.root / SIGNING_KEY_FILE
    loaded = key_file.read_bytes()
    key_file.unlink()

    _, download = await stored_download_url(local_storage)
    async with httpx.AsyncClient() as client:
        reply = await client.get(download)

    assert reply.status_code == 200
    assert local_storage.signing_key == loaded
    assert not key_file.exists()


# Temporary files left by a crash.


async def test_stale_temporaries_are_removed(local_storage: LocalStorage) -> None:
    kept_key = new_key()
    await local_storage.put(kept_key, b"data", content_type="text/plain")
    stale, stale_file = local_storage.create_temporary(local_storage.object_path(new_key()))
    fresh, fresh_file = local_storage.create_temporary(local_storage.object_path(new_key()))
    stale_file.close()
    fresh_file.close()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    removed = await local_storage.remove_stale_temporaries(600)

    assert removed == 1
    assert not stale.exists()
    assert not stale.parent.exists()
    assert fresh.exists()
    assert await local_storage.get(kept_key) == b"data"


async def test_remove_stale_temporaries_on_empty_store(local_storage: LocalStorage) -> None:
    assert await local_storage.remove_stale_temporaries(0) == 0


async def test_remove_stale_temporaries_with_missing_root(local_storage: LocalStorage) -> None:
    remove_objects_root(local_storage)

    with pytest.raises(StorageUnavailable):
        await local_storage.remove_stale_temporaries(600)
