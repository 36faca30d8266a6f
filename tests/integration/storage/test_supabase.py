"""SupabaseStorage against the Storage stand-in: error mapping, failures, and what goes on the wire."""

from __future__ import annotations

import secrets
import time
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from storage3.exceptions import StorageApiError

from app.platform.storage import (
    ObjectAlreadyExists,
    ObjectNotFound,
    ObjectRejected,
    StorageError,
    StorageUnavailable,
    create_storage,
)
from app.platform.storage import supabase as supabase_module
from app.platform.storage.supabase import SupabaseStorage, _translate
from app.settings import Settings
from tests.servers import free_port
from tests.support.supabase_storage import SupabaseStorageStandIn

# The client's default content type, which must never reach Storage.
STORAGE3_DEFAULT_CONTENT_TYPE = "text/plain;charset=UTF-8"


def new_key() -> str:
    return f"user-{secrets.token_hex(6)}/file-{secrets.token_hex(4)}"


# Operations of the port, each as a call on a fresh key.
OPERATIONS = {
    "put": lambda storage, key: storage.put(key, b"x", content_type="image/png"),
    "get": lambda storage, key: storage.get(key),
    "info": lambda storage, key: storage.info(key),
    "delete": lambda storage, key: storage.delete([key]),
    "list_keys": lambda storage, key: storage.list_keys(key.split("/")[0]),
    "signed_download_url": lambda storage, key: storage.signed_download_url(key, expires_in_seconds=60, file_name="a", inline=True),
    # Signed for a new key below `key`: Storage refuses to sign an upload over an existing object.
    "signed_upload_url": lambda storage, key: storage.signed_upload_url(
        f"{key}/upload", expires_in_seconds=60, content_type="image/png", max_bytes=10
    ),
}


# Error bodies.


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        ("404", "not_found", ObjectNotFound),
        ("409", "Duplicate", ObjectAlreadyExists),
        ("413", "Payload too large", ObjectRejected),
        ("415", "invalid_mime_type", ObjectRejected),
        ("429", "too_many_requests", StorageUnavailable),
        ("500", "internal", StorageUnavailable),
        ("503", "SlowDown", StorageUnavailable),
        ("544", "DatabaseTimeout", StorageUnavailable),
        (502, "InternalError", StorageUnavailable),
        ("400", "InvalidRequest", StorageError),
        ("403", "Unauthorized", StorageError),
        ("404", "Bucket not found", StorageError),
    ],
)
def test_error_body_maps_to_port_error(status, error: str, expected: type[StorageError]) -> None:
    translated = _translate(StorageApiError("message", error, status), "get", "u/f")

    assert type(translated) is expected


async def test_missing_object_raises_not_found(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    with pytest.raises(ObjectNotFound) as raised:
        await supabase_storage.get(new_key())

    assert isinstance(raised.value.__cause__, StorageApiError)
    assert raised.value.__cause__.status == "404"


async def test_existing_key_raises_already_exists(supabase_storage: SupabaseStorage) -> None:
    key = new_key()
    await supabase_storage.put(key, b"first", content_type="text/plain")

    # storage3's upload without upsert, through the adapter's error mapping.
    with pytest.raises(ObjectAlreadyExists):
        await supabase_storage._call("put", key, lambda: supabase_storage._bucket.upload(key, b"x", {"content-type": "text/plain"}))


async def test_disallowed_mime_type_raises_rejected(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    supabase_standin.restrict_bucket(allowed_mime_types=["image/*"])

    with pytest.raises(ObjectRejected):
        await supabase_storage.put(new_key(), b"hello", content_type="text/plain")
    info = await supabase_storage.put(new_key(), b"\x89PNG", content_type="image/png")
    assert info.content_type == "image/png"


async def test_object_over_bucket_limit_raises_rejected(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    supabase_standin.restrict_bucket(file_size_limit=10)

    with pytest.raises(ObjectRejected):
        await supabase_storage.put(new_key(), b"x" * 11, content_type="text/plain")


async def test_unknown_bucket_is_not_a_missing_object(supabase_standin: SupabaseStorageStandIn) -> None:
    storage = SupabaseStorage(url=supabase_standin.url, service_key=supabase_standin.service_key, bucket="no-such-bucket", timeout_seconds=1.0)
    try:
        with pytest.raises(StorageError) as raised:
            await storage.get(new_key())
    finally:
        await storage.aclose()

    assert type(raised.value) is StorageError


async def test_wrong_service_key_raises_storage_error(supabase_standin: SupabaseStorageStandIn) -> None:
    storage = SupabaseStorage(url=supabase_standin.url, service_key="wrong-key", bucket=supabase_standin.bucket, timeout_seconds=1.0)
    try:
        with pytest.raises(StorageError) as raised:
            await storage.get(new_key())
    finally:
        await storage.aclose()

    assert type(raised.value) is StorageError


# Failures of the connection or the server.


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("mode", ["503", "close"])
async def test_server_failure_raises_unavailable(
    supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn, operation: str, mode: str
) -> None:
    supabase_standin.fail_next(1, mode)

    with pytest.raises(StorageUnavailable):
        await OPERATIONS[operation](supabase_storage, new_key())


@pytest.mark.parametrize("operation", ["put", "get", "signed_upload_url"])
async def test_hang_raises_unavailable_after_timeout(
    supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn, operation: str
) -> None:
    supabase_standin.fail_next(1, "hang")
    started = time.monotonic()

    with pytest.raises(StorageUnavailable, match="timed out"):
        await OPERATIONS[operation](supabase_storage, new_key())

    assert time.monotonic() - started < supabase_storage.timeout_seconds + 1.0


async def test_refused_connection_raises_unavailable() -> None:
    storage = SupabaseStorage(url=f"http://127.0.0.1:{free_port()}", service_key="k", bucket="files", timeout_seconds=1.0)
    try:
        with pytest.raises(StorageUnavailable):
            await storage.get(new_key())
    finally:
        await storage.aclose()


async def test_call_after_failure_succeeds(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    key = new_key()
    await supabase_storage.put(key, b"kept", content_type="text/plain")
    supabase_standin.fail_next(1, "close")

    with pytest.raises(StorageUnavailable):
        await supabase_storage.get(key)
    assert await supabase_storage.get(key) == b"kept"


# What goes on the wire.


async def test_upload_sends_explicit_content_type(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    await supabase_storage.put(new_key(), b"\x89PNG", content_type="image/png")

    uploads = [request for request in supabase_standin.requests if request.upload_content_type is not None]
    assert [request.upload_content_type for request in uploads] == ["image/png"]


async def test_default_content_type_is_never_sent(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    key = new_key()
    await supabase_storage.put(key, b"a", content_type="application/pdf")
    await supabase_storage.put(key, b"b", content_type="text/plain")

    for request in supabase_standin.requests:
        assert request.upload_content_type != STORAGE3_DEFAULT_CONTENT_TYPE
        assert STORAGE3_DEFAULT_CONTENT_TYPE not in request.headers.values()
    assert (await supabase_storage.info(key)).content_type == "text/plain"


async def test_upload_sends_upsert_as_string_true(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    await supabase_storage.put(new_key(), b"a", content_type="text/plain")

    upload = next(request for request in supabase_standin.requests if request.upload_content_type is not None)
    assert upload.method == "POST"
    assert upload.headers["x-upsert"] == "true"


async def test_every_call_sends_service_key(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    key = new_key()
    # Delete last, so that every other call finds the object.
    for name in sorted(OPERATIONS, key=lambda name: (name == "delete", name != "put")):
        await OPERATIONS[name](supabase_storage, key)

    assert len(supabase_standin.requests) >= len(OPERATIONS)
    for request in supabase_standin.requests:
        assert request.headers["apikey"] == supabase_standin.service_key
        assert request.headers["authorization"] == f"Bearer {supabase_standin.service_key}"


async def test_list_keys_reads_every_page(supabase_storage: SupabaseStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supabase_module, "LIST_PAGE_SIZE", 2)
    uid = f"user-{secrets.token_hex(6)}"
    keys = [f"{uid}/file-{index}" for index in range(5)] + [f"{uid}/file-0/thumbnail"]
    for key in keys:
        await supabase_storage.put(key, b"x", content_type="text/plain")

    assert await supabase_storage.list_keys(uid) == sorted(keys)


async def test_delete_sends_batches(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supabase_module, "DELETE_BATCH_SIZE", 2)
    uid = f"user-{secrets.token_hex(6)}"
    keys = [f"{uid}/file-{index}" for index in range(5)]
    for key in keys:
        await supabase_storage.put(key, b"x", content_type="text/plain")

    await supabase_storage.delete(keys)

    assert await supabase_storage.list_keys(uid) == []
    assert len([request for request in supabase_standin.requests if request.method == "DELETE"]) == 3


@pytest.mark.parametrize("file_name", ["report.pdf", "a b+c&d=e#f.txt", "ünï 😀.png", 'x"y;z\r\n.txt'])
async def test_attachment_url_carries_file_name(supabase_storage: SupabaseStorage, file_name: str) -> None:
    key = new_key()
    await supabase_storage.put(key, b"data", content_type="application/pdf")

    url = await supabase_storage.signed_download_url(key, expires_in_seconds=60, file_name=file_name, inline=False)
    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert parse_qs(urlsplit(url).query)["download"] == [file_name]
    assert reply.status_code == 200
    encoded = reply.headers["content-disposition"].split("filename*=UTF-8''")[1].rstrip(";")
    assert unquote(encoded) == file_name


async def test_inline_url_has_no_download_parameter(supabase_storage: SupabaseStorage) -> None:
    key = new_key()
    await supabase_storage.put(key, b"data", content_type="image/png")

    url = await supabase_storage.signed_download_url(key, expires_in_seconds=60, file_name="a.png", inline=True)

    assert "download" not in parse_qs(urlsplit(url).query)
    assert "token" in parse_qs(urlsplit(url).query)


async def test_forged_download_token_is_rejected(supabase_storage: SupabaseStorage) -> None:
    key = new_key()
    await supabase_storage.put(key, b"secret", content_type="text/plain")
    url = await supabase_storage.signed_download_url(key, expires_in_seconds=60, file_name="a", inline=True)

    async with httpx.AsyncClient() as client:
        reply = await client.get(url[:-4] + "AAAA")

    assert reply.status_code == 400
    assert reply.json()["message"] == "Bucket not found"
    assert b"secret" not in reply.content


async def test_signed_upload_sends_no_upsert(supabase_storage: SupabaseStorage, supabase_standin: SupabaseStorageStandIn) -> None:
    supabase_standin.reset()

    await supabase_storage.signed_upload_url(new_key(), expires_in_seconds=60, content_type="text/plain", max_bytes=10)

    signing = [request for request in supabase_standin.requests if "/object/upload/sign/" in request.path]
    assert signing
    assert all("x-upsert" not in request.headers for request in signing)


@pytest.mark.parametrize(("url", "service_key"), [("http://127.0.0.1:1", ""), ("http://127.0.0.1:1", " key "), ("127.0.0.1:1", "key")])
def test_bad_configuration_is_rejected_at_start(url: str, service_key: str) -> None:
    with pytest.raises(ValueError, match="SUPABASE_"):
        SupabaseStorage(url=url, service_key=service_key, bucket="files")


async def test_create_storage_picks_supabase(supabase_standin: SupabaseStorageStandIn) -> None:
    env = supabase_standin.env()
    settings = Settings(
        storage_backend=env["STORAGE_BACKEND"],
        supabase_url=env["SUPABASE_URL"],
        supabase_service_key=env["SUPABASE_SERVICE_KEY"],
        supabase_storage_bucket=env["SUPABASE_STORAGE_BUCKET"],
    )

    storage = create_storage(settings)
    await storage.aclose()

    assert isinstance(storage, SupabaseStorage)
    assert storage.storage_url == f"{supabase_standin.url}/storage/v1/"
    assert storage.bucket_name == supabase_standin.bucket
