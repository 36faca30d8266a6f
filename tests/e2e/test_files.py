"""FileService against real servers, one per storage adapter: the local adapter serving its own
signed URLs, and the Supabase adapter against the Storage stand-in on a loopback socket.

Every RPC runs over Connect JSON and native gRPC, with real bytes: PNG and JPEG images with
EXIF, a text file that claims to be a PNG, an empty file, files at and past the size limit.
Signed URLs are fetched with plain HTTP (PUT, GET, Range). The servers use SQLite; the store and
logic run on Postgres too in tests/integration/files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from functions.file.v1 import file_pb2
from functions.user.v1 import user_pb2
from google.protobuf import json_format
from PIL import Image

from tests.e2e.clients import Protocol, RpcError, call, call_client_stream
from tests.e2e.conftest import Tokens, server_env
from tests.servers import ROOT, RunningServer, run_migrations, start_server
from tests.support.files import exif_of, has_gps, jpeg_with_exif, png_bytes
from tests.support.supabase_storage import SupabaseStorageStandIn, run_supabase_storage

SERVICE = "functions.file.v1.FileService"
ADAPTERS = ["local", "supabase"]
PROTOCOLS = [Protocol.CONNECT_JSON, Protocol.GRPC]
MAX_BYTES = 6000
QUOTA_BYTES = 20_000
QUOTA_COUNT = 6
# The smallest lifetimes the settings allow, so expiry tests wait as little as possible.
URL_TTL_SECONDS = 10
READY_TIMEOUT_SECONDS = 10.0
TEXT = b"plain text, nothing more\n"


@dataclass
class Deployment:
    """One server with its storage adapter, restartable on the same database and storage."""

    adapter: str
    env: dict[str, str]
    directory: Path
    server: RunningServer
    standin: SupabaseStorageStandIn | None

    @property
    def address(self) -> str:
        return self.server.address

    def kill_and_restart(self) -> None:
        """Kill the server without a graceful shutdown, as a crash would, and start it again."""
        self.server.stop(signal.SIGKILL)
        self.server = start_server(self.env, self.directory / "server.log")

    def current_url(self, url: str) -> str:
        """Point a signed URL of the local adapter at the server's port, which changes on restart."""
        if self.standin is not None:
            return url
        return urlunsplit(urlsplit(url)._replace(netloc=self.address))

    def object_keys(self, uid: str) -> list[str]:
        """List the stored keys of a user, read from the storage itself rather than through the service."""
        if self.standin is not None:
            return sorted(key for key in self.standin.buckets[self.standin.bucket] if key.startswith(f"{uid}/"))
        root = self.directory / "files" / "objects" / uid
        return sorted(str(path.relative_to(root.parent)).removesuffix("~object") for path in root.rglob("*~object"))

    def stored_content_type(self, key: str) -> str:
        if self.standin is not None:
            return self.standin.buckets[self.standin.bucket][key].content_type
        return ""


def _start(adapter: str, directory: Path, cert_server, standin: SupabaseStorageStandIn | None) -> Deployment:
    storage_env = standin.env() if standin is not None else {"STORAGE_BACKEND": "local"}
    env = server_env(
        cert_server,
        f"sqlite+aiosqlite:///{directory / 'functions.db'}",
        DEV_KEYS_DIR=str(directory / "dev-keys"),
        ENABLED_SERVICES="auth,users,files",
        STORAGE_LOCAL_DIR=str(directory / "files"),
        FILES_MAX_BYTES=str(MAX_BYTES),
        FILES_QUOTA_BYTES=str(QUOTA_BYTES),
        FILES_QUOTA_COUNT=str(QUOTA_COUNT),
        FILES_UPLOAD_URL_TTL_SECONDS=str(URL_TTL_SECONDS),
        FILES_DOWNLOAD_URL_TTL_SECONDS=str(URL_TTL_SECONDS),
        **storage_env,
    )
    run_migrations(env)
    server = start_server(env, directory / "server.log")
    return Deployment(adapter, env, directory, server, standin)


@pytest.fixture(scope="module")
def deployments(tmp_path_factory, cert_server) -> Iterator[dict[str, Deployment]]:
    with run_supabase_storage() as standin:
        directories = {adapter: tmp_path_factory.mktemp(f"files-{adapter}") for adapter in ADAPTERS}
        standins = {"local": None, "supabase": standin}
        # Both servers start at once, which halves the wait.
        with concurrent.futures.ThreadPoolExecutor(len(ADAPTERS)) as pool:
            futures = {a: pool.submit(_start, a, directories[a], cert_server, standins[a]) for a in ADAPTERS}
            started = {adapter: future.result() for adapter, future in futures.items()}
        try:
            yield started
        finally:
            for deployment in started.values():
                deployment.server.stop()


@pytest.fixture(params=ADAPTERS)
def deployment(request, deployments) -> Deployment:
    return deployments[request.param]


@pytest.fixture(params=PROTOCOLS, ids=lambda protocol: protocol.value)
def protocol(request) -> Protocol:
    return request.param


def new_uid() -> str:
    return f"files-{secrets.token_hex(6)}"


async def rpc(deployment: Deployment, protocol: Protocol, method: str, request, response_type, token: str):
    return await call(protocol, deployment.address, SERVICE, method, request, response_type, token=token)


async def rpc_error(deployment: Deployment, protocol: Protocol, method: str, request, response_type, token: str) -> RpcError:
    with pytest.raises(RpcError) as raised:
        await rpc(deployment, protocol, method, request, response_type, token)
    return raised.value


async def create_upload(
    deployment: Deployment, protocol: Protocol, token: str, data: bytes, content_type: str, name: str = "file", **fields
) -> file_pb2.CreateUploadResponse:
    request = file_pb2.CreateUploadRequest(name=name, content_type=content_type, size=len(data), **fields)
    return await rpc(deployment, protocol, "CreateUpload", request, file_pb2.CreateUploadResponse, token)


async def put(created: file_pb2.CreateUploadResponse, data: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.put(created.upload_url, content=data, headers=dict(created.upload_headers))


async def complete(deployment: Deployment, protocol: Protocol, token: str, file_id: str) -> file_pb2.File:
    request = file_pb2.CompleteUploadRequest(file_id=file_id)
    return (await rpc(deployment, protocol, "CompleteUpload", request, file_pb2.CompleteUploadResponse, token)).file


async def upload_via_url(
    deployment: Deployment, protocol: Protocol, token: str, data: bytes, content_type: str, name: str = "file"
) -> file_pb2.File:
    """Run the browser flow: CreateUpload, PUT the bytes, CompleteUpload."""
    created = await create_upload(deployment, protocol, token, data, content_type, name)
    response = await put(created, data)
    assert response.status_code in (200, 201), response.text
    return await complete(deployment, protocol, token, created.file.id)


def upload_messages(name: str, content_type: str, data: bytes, *, size: int | None = None, chunk_size: int = 1024) -> list:
    metadata = file_pb2.UploadMetadata(name=name, content_type=content_type, size=size)
    chunks = [data[start : start + chunk_size] for start in range(0, len(data), chunk_size)]
    return [file_pb2.UploadRequest(metadata=metadata), *(file_pb2.UploadRequest(chunk=chunk) for chunk in chunks)]


async def stream_upload(deployment: Deployment, protocol: Protocol, token: str, messages: list) -> file_pb2.File:
    response = await call_client_stream(
        protocol, deployment.address, SERVICE, "Upload", messages, file_pb2.UploadResponse, token=token
    )
    return response.file


async def get_file(deployment: Deployment, token: str, file_id: str, protocol: Protocol = Protocol.CONNECT_JSON) -> file_pb2.File:
    request = file_pb2.GetFileRequest(file_id=file_id)
    return (await rpc(deployment, protocol, "GetFile", request, file_pb2.GetFileResponse, token)).file


async def wait_processed(deployment: Deployment, token: str, file_id: str) -> file_pb2.File:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        file = await get_file(deployment, token, file_id)
        if file.status != file_pb2.FILE_STATUS_PROCESSING or time.monotonic() > deadline:
            return file
        await asyncio.sleep(0.1)


async def download_url(
    deployment: Deployment, protocol: Protocol, token: str, file_id: str, **fields
) -> file_pb2.GetDownloadUrlResponse:
    request = file_pb2.GetDownloadUrlRequest(file_id=file_id, **fields)
    return await rpc(deployment, protocol, "GetDownloadUrl", request, file_pb2.GetDownloadUrlResponse, token)


async def fetch(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url, headers=headers)


def tampered(url: str) -> str:
    """Change one character of the URL's signature or token."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    name, value = next((n, v) for n, v in query if n in ("signature", "token"))
    changed = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    query = [(n, changed if n == name else v) for n, v in query]
    return urlunsplit(parts._replace(query=urlencode(query)))


def text_of_size(size: int) -> bytes:
    line = b"0123456789abcdef\n"
    return (line * (size // len(line) + 1))[:size]


# The browser flow and content checks.


async def test_one_pixel_png_served_as_png(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    if deployment.standin is not None:
        deployment.standin.restrict_bucket(allowed_mime_types=["image/*"])
    try:
        completed = await upload_via_url(deployment, protocol, token, png_bytes(), "image/png", "dot.png")
        ready = await wait_processed(deployment, token, completed.id)
        target = await download_url(deployment, protocol, token, ready.id, disposition=file_pb2.DISPOSITION_INLINE)
        served = await fetch(target.url)
    finally:
        if deployment.standin is not None:
            deployment.standin.restrict_bucket()

    assert completed.status == file_pb2.FILE_STATUS_PROCESSING
    assert ready.status == file_pb2.FILE_STATUS_READY
    assert ready.content_type == "image/png"
    assert ready.has_thumbnail
    assert ready.sha256 == hashlib.sha256(png_bytes()).hexdigest()
    assert target.content_type == "image/png"
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/png"
    # Supabase Storage sends no Content-Disposition for inline replies.
    assert served.headers.get("content-disposition", "inline").startswith("inline")
    assert Image.open(io.BytesIO(served.content)).size == (1, 1)
    if deployment.standin is not None:
        assert deployment.stored_content_type(f"{ready.uid}/{ready.id}") == "image/png"


async def test_text_declared_as_png_is_invalid_argument(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    created = await create_upload(deployment, protocol, token, TEXT, "image/png", "not-a-picture.png")
    await put(created, TEXT)

    error = await rpc_error(
        deployment, protocol, "CompleteUpload", file_pb2.CompleteUploadRequest(file_id=created.file.id),
        file_pb2.CompleteUploadResponse, token,
    )

    assert error.code == "invalid_argument"
    assert error.reason == "CONTENT_TYPE_MISMATCH"
    assert "declared image/png, but the bytes are text/plain" in error.violations["content_type"]
    assert (await get_file(deployment, token, created.file.id)).status == file_pb2.FILE_STATUS_PENDING


async def test_jpeg_exif_is_stripped_from_served_bytes(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    jpeg = jpeg_with_exif(64, 48)
    assert len(jpeg) <= MAX_BYTES

    uploaded = await stream_upload(deployment, protocol, token, upload_messages("photo.jpg", "image/jpeg", jpeg))
    ready = await wait_processed(deployment, token, uploaded.id)
    original = await fetch((await download_url(deployment, protocol, token, ready.id)).url)
    thumbnail_target = await download_url(deployment, protocol, token, ready.id, variant=file_pb2.FILE_VARIANT_THUMBNAIL)
    thumbnail = await fetch(thumbnail_target.url)

    assert has_gps(jpeg)
    assert ready.status == file_pb2.FILE_STATUS_READY
    assert ready.has_thumbnail
    assert original.headers["content-type"] == "image/jpeg"
    assert original.headers["content-disposition"].startswith("attachment")
    assert not has_gps(original.content)
    assert "Make" not in exif_of(original.content)
    assert thumbnail.status_code == 200
    assert thumbnail.headers["content-type"] == thumbnail_target.content_type
    assert Image.open(io.BytesIO(thumbnail.content)).format in ("JPEG", "PNG")


async def test_unreadable_image_becomes_failed(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    # A PNG signature passes the sniffer, but Pillow cannot decode what follows.
    corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8

    uploaded = await stream_upload(deployment, protocol, token, upload_messages("broken.png", "image/png", corrupt))
    failed = await wait_processed(deployment, token, uploaded.id)
    error = await rpc_error(
        deployment, protocol, "GetDownloadUrl", file_pb2.GetDownloadUrlRequest(file_id=uploaded.id),
        file_pb2.GetDownloadUrlResponse, token,
    )

    assert failed.status == file_pb2.FILE_STATUS_FAILED
    assert failed.failure_reason.startswith("the image could not be processed")
    assert error.code == "failed_precondition"
    assert deployment.object_keys(uploaded.uid) == []


@pytest.mark.parametrize("protocol", [Protocol.CONNECT_JSON, Protocol.CONNECT_PROTO, Protocol.GRPC], ids=lambda p: p.value)
async def test_upload_stream_over_each_protocol(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    data = text_of_size(3000)

    uploaded = await stream_upload(deployment, protocol, token, upload_messages("notes.txt", "text/plain", data, size=len(data)))
    served = await fetch((await download_url(deployment, Protocol.CONNECT_JSON, token, uploaded.id)).url)

    assert uploaded.status == file_pb2.FILE_STATUS_READY
    assert uploaded.size == len(data)
    assert served.content == data


async def test_upload_without_metadata_first_is_invalid(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    metadata = file_pb2.UploadRequest(metadata=file_pb2.UploadMetadata(name="notes.txt", content_type="text/plain"))
    chunk = file_pb2.UploadRequest(chunk=TEXT)

    with pytest.raises(RpcError) as chunk_first:
        await stream_upload(deployment, protocol, token, [chunk, metadata])
    with pytest.raises(RpcError) as metadata_twice:
        await stream_upload(deployment, protocol, token, [metadata, chunk, metadata])

    assert chunk_first.value.code == "invalid_argument"
    assert chunk_first.value.violations["metadata"] == "must be set in the first message of the stream"
    assert metadata_twice.value.code == "invalid_argument"
    assert metadata_twice.value.violations["metadata"] == "must be set in the first message only"


async def test_empty_file_is_invalid_argument(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())

    reserved = await rpc_error(
        deployment, protocol, "CreateUpload", file_pb2.CreateUploadRequest(name="empty.txt", content_type="text/plain", size=0),
        file_pb2.CreateUploadResponse, token,
    )
    with pytest.raises(RpcError) as streamed:
        await stream_upload(deployment, protocol, token, upload_messages("empty.txt", "text/plain", b""))

    assert reserved.code == "invalid_argument"
    assert reserved.violations["size"] == "must be at least 1 byte: got 0"
    assert streamed.value.code == "invalid_argument"
    assert "chunk" in streamed.value.violations


async def test_size_limit_boundary(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    at_limit = text_of_size(MAX_BYTES)
    over_limit = text_of_size(MAX_BYTES + 1)

    accepted = await upload_via_url(deployment, protocol, token, at_limit, "text/plain", "limit.txt")
    with pytest.raises(RpcError) as reserved:
        await create_upload(deployment, protocol, token, over_limit, "text/plain", "over.txt")
    with pytest.raises(RpcError) as streamed:
        await stream_upload(deployment, protocol, token, upload_messages("over.txt", "text/plain", over_limit))

    assert accepted.status == file_pb2.FILE_STATUS_READY
    assert accepted.size == MAX_BYTES
    for error in (reserved.value, streamed.value):
        assert error.code == "resource_exhausted"
        assert error.reason == "FILE_TOO_LARGE"
        assert f"maximum of {MAX_BYTES} bytes per file: got {MAX_BYTES + 1} bytes" in error.message


async def test_quota_exceeded_names_the_numbers(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    for index in range(3):
        await create_upload(deployment, protocol, token, text_of_size(MAX_BYTES), "text/plain", f"{index}.txt")

    by_bytes = await rpc_error(
        deployment, protocol, "CreateUpload",
        file_pb2.CreateUploadRequest(name="more.txt", content_type="text/plain", size=QUOTA_BYTES - 3 * MAX_BYTES + 1),
        file_pb2.CreateUploadResponse, token,
    )
    for index in range(QUOTA_COUNT - 3):
        await create_upload(deployment, protocol, token, b"x", "text/plain", f"small-{index}.txt")
    by_count = await rpc_error(
        deployment, protocol, "CreateUpload", file_pb2.CreateUploadRequest(name="one.txt", content_type="text/plain", size=1),
        file_pb2.CreateUploadResponse, token,
    )

    assert by_bytes.code == "resource_exhausted"
    assert by_bytes.message == (
        f"storage quota exceeded: {3 * MAX_BYTES} of {QUOTA_BYTES} bytes used, {QUOTA_BYTES - 3 * MAX_BYTES + 1} more requested"
    )
    assert by_count.code == "resource_exhausted"
    assert by_count.message == f"file count quota exceeded: {QUOTA_COUNT} of {QUOTA_COUNT} files used, 1 more requested"


@pytest.mark.parametrize(("declared", "field"), [({"size": len(TEXT) + 1}, "size"), ({"sha256": "ab" * 32}, "sha256")])
async def test_size_and_hash_mismatch_are_invalid(deployment, protocol, tokens: Tokens, declared: dict, field: str) -> None:
    token = tokens.mint(new_uid())
    request = file_pb2.CreateUploadRequest(name="notes.txt", content_type="text/plain", size=len(TEXT))
    for name, value in declared.items():
        setattr(request, name, value)
    created = await rpc(deployment, protocol, "CreateUpload", request, file_pb2.CreateUploadResponse, token)
    async with httpx.AsyncClient(timeout=30) as client:
        # Storage may refuse more bytes than the URL allows, so the PUT always sends the real ones.
        await client.put(created.upload_url, content=TEXT, headers=dict(created.upload_headers))

    error = await rpc_error(
        deployment, protocol, "CompleteUpload", file_pb2.CompleteUploadRequest(file_id=created.file.id),
        file_pb2.CompleteUploadResponse, token,
    )

    assert error.code == "invalid_argument"
    assert field in error.violations


async def test_complete_before_put_is_failed_precondition(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    created = await create_upload(deployment, protocol, token, TEXT, "text/plain")

    error = await rpc_error(
        deployment, protocol, "CompleteUpload", file_pb2.CompleteUploadRequest(file_id=created.file.id),
        file_pb2.CompleteUploadResponse, token,
    )

    assert error.code == "failed_precondition"
    assert "upload the bytes first" in error.message


# Signed URLs.


async def test_range_request_gets_partial_content(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    data = text_of_size(1000)
    uploaded = await upload_via_url(deployment, protocol, token, data, "text/plain")
    target = await download_url(deployment, protocol, token, uploaded.id)

    partial = await fetch(target.url, range="bytes=100-199")

    assert partial.status_code == 206
    assert partial.content == data[100:200]
    assert partial.headers["content-range"] == f"bytes 100-199/{len(data)}"


async def test_upload_url_cannot_replace_completed_file(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    data = b"the accepted text\n"
    created = await create_upload(deployment, protocol, token, data, "text/plain")
    assert (await put(created, data)).status_code == 200
    await complete(deployment, protocol, token, created.file.id)

    replaced = await put(created, b"other bytes\n" + b" " * (len(data) - 12))
    served = await fetch((await download_url(deployment, protocol, token, created.file.id)).url)

    # Local replies 409 (the object exists) or 410 (its upload gate), and Supabase 400 with statusCode "409".
    assert replaced.status_code in (400, 409, 410)
    assert served.content == data


async def test_upload_url_refuses_put_after_delete(deployment, protocol, tokens: Tokens) -> None:
    if deployment.standin is not None:
        pytest.skip("Supabase upload URLs cannot be revoked; tests/integration/files covers the sweep of what they store")
    token = tokens.mint(new_uid())
    created = await create_upload(deployment, protocol, token, TEXT, "text/plain")

    request = file_pb2.DeleteFileRequest(file_id=created.file.id)
    await rpc(deployment, protocol, "DeleteFile", request, file_pb2.DeleteFileResponse, token)
    late = await put(created, TEXT)

    assert late.status_code == 410
    assert deployment.object_keys(created.file.uid) == []


async def test_stream_shorter_than_declared_is_invalid(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())

    with pytest.raises(RpcError) as raised:
        await stream_upload(deployment, protocol, token, upload_messages("notes.txt", "text/plain", b"hello", size=300))

    assert raised.value.code == "invalid_argument"
    assert "declared 300, received 5" in raised.value.violations["size"]


async def test_thumbnail_downloads_under_thumbnail_name(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    uploaded = await stream_upload(deployment, protocol, token, upload_messages("red.png", "image/png", png_bytes(8, 8)))
    ready = await wait_processed(deployment, token, uploaded.id)

    target = await download_url(deployment, protocol, token, ready.id, variant=file_pb2.FILE_VARIANT_THUMBNAIL)
    served = await fetch(target.url)

    assert target.content_type == "image/jpeg"
    assert served.headers["content-type"] == "image/jpeg"
    assert served.headers["content-disposition"].startswith("attachment")
    assert "red.thumbnail.jpg" in served.headers["content-disposition"]


async def test_tampered_url_is_rejected(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    uploaded = await upload_via_url(deployment, protocol, token, TEXT, "text/plain")
    target = await download_url(deployment, protocol, token, uploaded.id)

    genuine = await fetch(target.url)
    forged = await fetch(tampered(target.url))

    assert genuine.content == TEXT
    assert 400 <= forged.status_code < 500
    assert TEXT not in forged.content


# Access, listing, renaming and deleting.


async def test_other_users_file_is_not_found(deployment, protocol, tokens: Tokens) -> None:
    owner_uid = new_uid()
    owner, stranger, admin = tokens.mint(owner_uid), tokens.mint(new_uid()), tokens.mint(new_uid(), roles=["admin"])
    uploaded = await upload_via_url(deployment, protocol, owner, TEXT, "text/plain")
    requests = [
        ("GetFile", file_pb2.GetFileRequest(file_id=uploaded.id), file_pb2.GetFileResponse),
        ("CompleteUpload", file_pb2.CompleteUploadRequest(file_id=uploaded.id), file_pb2.CompleteUploadResponse),
        ("GetDownloadUrl", file_pb2.GetDownloadUrlRequest(file_id=uploaded.id), file_pb2.GetDownloadUrlResponse),
        ("RenameFile", file_pb2.RenameFileRequest(file_id=uploaded.id, name="mine.txt"), file_pb2.RenameFileResponse),
        ("DeleteFile", file_pb2.DeleteFileRequest(file_id=uploaded.id), file_pb2.DeleteFileResponse),
    ]

    for method, request, response_type in requests:
        error = await rpc_error(deployment, protocol, method, request, response_type, stranger)
        assert error.code == "not_found", method
        assert error.message == f"file {uploaded.id} not found"
        assert owner_uid not in error.message
    seen_by_admin = await get_file(deployment, admin, uploaded.id, protocol)
    assert seen_by_admin.uid == owner_uid
    listed = await rpc(deployment, protocol, "ListFiles", file_pb2.ListFilesRequest(), file_pb2.ListFilesResponse, stranger)
    assert list(listed.files) == []


async def test_list_pages_and_filters(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    texts = [await upload_via_url(deployment, protocol, token, TEXT, "text/plain", f"{index}.txt") for index in range(3)]
    pending = (await create_upload(deployment, protocol, token, TEXT, "text/plain", "pending.txt")).file

    first = await rpc(deployment, protocol, "ListFiles", file_pb2.ListFilesRequest(page_size=2), file_pb2.ListFilesResponse, token)
    second = await rpc(
        deployment, protocol, "ListFiles", file_pb2.ListFilesRequest(page_size=2, page_token=first.next_page_token),
        file_pb2.ListFilesResponse, token,
    )
    ready = await rpc(
        deployment, protocol, "ListFiles", file_pb2.ListFilesRequest(status=file_pb2.FILE_STATUS_READY),
        file_pb2.ListFilesResponse, token,
    )
    no_pdf = await rpc(
        deployment, protocol, "ListFiles", file_pb2.ListFilesRequest(content_type="application/pdf"),
        file_pb2.ListFilesResponse, token,
    )
    bad_token = await rpc_error(
        deployment, protocol, "ListFiles", file_pb2.ListFilesRequest(page_token="v1.forged"), file_pb2.ListFilesResponse, token
    )

    assert [f.id for f in [*first.files, *second.files]] == [pending.id, *[f.id for f in reversed(texts)]]
    assert second.next_page_token == ""
    assert [f.id for f in ready.files] == [f.id for f in reversed(texts)]
    assert list(no_pdf.files) == []
    assert bad_token.code == "invalid_argument"
    assert "page_token" in bad_token.violations


async def test_rename_changes_name_and_etag(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    uploaded = await upload_via_url(deployment, protocol, token, TEXT, "text/plain", "before.txt")
    name = 'rapport "final" ü/\\..; 🙂.txt'

    renamed = (await rpc(
        deployment, protocol, "RenameFile", file_pb2.RenameFileRequest(file_id=uploaded.id, name=name, etag=uploaded.etag),
        file_pb2.RenameFileResponse, token,
    )).file
    stale = await rpc_error(
        deployment, protocol, "RenameFile", file_pb2.RenameFileRequest(file_id=uploaded.id, name="x.txt", etag=uploaded.etag),
        file_pb2.RenameFileResponse, token,
    )
    invalid = await rpc_error(
        deployment, protocol, "RenameFile", file_pb2.RenameFileRequest(file_id=uploaded.id, name="nul\x00.txt"),
        file_pb2.RenameFileResponse, token,
    )

    assert renamed.name == name
    assert renamed.etag != uploaded.etag
    assert stale.code == "aborted"
    assert invalid.code == "invalid_argument"
    assert invalid.violations["name"] == "must not contain control characters: got U+0000 at index 3"
    assert deployment.object_keys(renamed.uid) == [f"{renamed.uid}/{renamed.id}"]


async def test_delete_removes_object(deployment, protocol, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())
    uploaded = await upload_via_url(deployment, protocol, token, TEXT, "text/plain")
    target = await download_url(deployment, protocol, token, uploaded.id)

    await rpc(deployment, protocol, "DeleteFile", file_pb2.DeleteFileRequest(file_id=uploaded.id), file_pb2.DeleteFileResponse, token)
    again = await rpc_error(
        deployment, protocol, "DeleteFile", file_pb2.DeleteFileRequest(file_id=uploaded.id), file_pb2.DeleteFileResponse, token
    )
    after = await fetch(target.url)

    assert again.code == "not_found"
    assert deployment.object_keys(uploaded.uid) == []
    assert 400 <= after.status_code < 500


async def test_user_deleted_removes_objects_and_rows(deployment, protocol, tokens: Tokens) -> None:
    uid = new_uid()
    token, admin = tokens.mint(uid), tokens.mint(new_uid(), roles=["admin"])
    uploaded = await upload_via_url(deployment, protocol, token, TEXT, "text/plain")
    image = await stream_upload(deployment, protocol, token, upload_messages("dot.png", "image/png", png_bytes()))
    await wait_processed(deployment, token, image.id)
    await call(protocol, deployment.address, "functions.user.v1.UserService", "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)

    # Without Firebase Admin credentials DeleteMe deletes the profile, then reports that the
    # Firebase account could not be disabled.
    with pytest.raises(RpcError):
        await call(protocol, deployment.address, "functions.user.v1.UserService", "DeleteMe", user_pb2.DeleteMeRequest(), user_pb2.DeleteMeResponse, token=token)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while deployment.object_keys(uid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)

    assert deployment.object_keys(uid) == []
    for file_id in (uploaded.id, image.id):
        error = await rpc_error(deployment, protocol, "GetFile", file_pb2.GetFileRequest(file_id=file_id), file_pb2.GetFileResponse, admin)
        assert error.code == "not_found"


async def test_storage_outage_is_unavailable(deployments, protocol, tokens: Tokens) -> None:
    deployment = deployments["supabase"]
    token = tokens.mint(new_uid())
    created = await create_upload(deployment, protocol, token, TEXT, "text/plain")
    await put(created, TEXT)

    deployment.standin.fail_next(1, "503")
    error = await rpc_error(
        deployment, protocol, "CompleteUpload", file_pb2.CompleteUploadRequest(file_id=created.file.id),
        file_pb2.CompleteUploadResponse, token,
    )
    retried = await complete(deployment, protocol, token, created.file.id)

    assert error.code == "unavailable"
    assert error.message == "file storage unavailable; retry later"
    assert retried.status == file_pb2.FILE_STATUS_READY


# A crash between the PUT and CompleteUpload, and expiry of URLs and abandoned uploads.


async def _crash_and_expire(deployment: Deployment, tokens: Tokens) -> dict[str, object]:
    protocol = Protocol.CONNECT_JSON
    token = tokens.mint(new_uid())
    abandoned = await create_upload(deployment, protocol, token, TEXT, "text/plain", "abandoned.txt")
    await put(abandoned, TEXT)
    completed_file = await upload_via_url(deployment, protocol, token, TEXT, "text/plain", "completed_file.txt")
    expiring = await download_url(deployment, protocol, token, completed_file.id)
    interrupted = await create_upload(deployment, protocol, token, TEXT, "text/plain", "interrupted.txt")
    await put(interrupted, TEXT)
    started = time.monotonic()

    await asyncio.to_thread(deployment.kill_and_restart)
    completed = await complete(deployment, protocol, token, interrupted.file.id)
    await asyncio.sleep(max(0.0, URL_TTL_SECONDS + 1.5 - (time.monotonic() - started)))
    sweep = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "app", "sweep-uploads"], env={**os.environ, **deployment.env}, cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )

    return {
        "completed": completed,
        "expired_download": await fetch(deployment.current_url(expiring.url)),
        "sweep": sweep,
        "abandoned_error": await rpc_error(
            deployment, protocol, "GetFile", file_pb2.GetFileRequest(file_id=abandoned.file.id), file_pb2.GetFileResponse, token
        ),
        "keys": deployment.object_keys(completed_file.uid),
        "completed_file": completed_file,
        "interrupted": interrupted.file,
    }


async def test_crash_then_complete_and_expiry(deployments, tokens: Tokens) -> None:
    # Both adapters run at once, so the wait for the URLs to expire is paid once.
    results = await asyncio.gather(*(_crash_and_expire(deployments[adapter], tokens) for adapter in ADAPTERS))

    for result in results:
        completed_file, interrupted = result["completed_file"], result["interrupted"]
        assert result["completed"].status == file_pb2.FILE_STATUS_READY
        assert 400 <= result["expired_download"].status_code < 500
        assert result["sweep"].returncode == 0, result["sweep"].stderr
        # The server's own sweeper may have removed the abandoned upload first.
        assert result["sweep"].stdout.startswith("removed ")
        assert result["abandoned_error"].code == "not_found"
        assert result["keys"] == sorted([f"{completed_file.uid}/{completed_file.id}", f"{interrupted.uid}/{interrupted.id}"])


# Upload streams that stall.


async def test_stalled_upload_stream_is_deadline_exceeded(deployments, tokens: Tokens) -> None:
    # A real server on a socket, with the default idle limit of 15 seconds. The stream sends its
    # metadata and one byte over Connect on HTTP/1.1 with a chunked body, then nothing.
    deployment = deployments["local"]
    token = tokens.mint(new_uid())
    frames = b""
    for message in upload_messages("notes.txt", "text/plain", b"p", size=len(TEXT)):
        payload = json_format.MessageToJson(message).encode()
        frames += struct.pack(">BI", 0, len(payload)) + payload
    host, port = deployment.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /{SERVICE}/Upload HTTP/1.1\r\nHost: {deployment.address}\r\n"
        "Content-Type: application/connect+json\r\nConnect-Protocol-Version: 1\r\n"
        f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + f"{len(frames):x}\r\n".encode()
        + frames
        + b"\r\n"
    )
    await writer.drain()

    # While the stream waits, another user's calls that buffer whole files still run.
    other_token = tokens.mint(new_uid())
    other = await upload_via_url(deployment, Protocol.CONNECT_JSON, other_token, TEXT, "text/plain")
    started = time.monotonic()
    reply = b""
    while b"deadline_exceeded" not in reply and time.monotonic() - started < 60:
        data = await asyncio.wait_for(reader.read(65536), 60)
        if not data:
            break
        reply += data
    writer.close()

    assert other.status == file_pb2.FILE_STATUS_READY
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b'"code":"deadline_exceeded"' in reply.replace(b" ", b"")
    assert b"upload stream stalled: no chunk arrived for 15 seconds" in reply
