"""The storage port's contract, run on both adapters with real sockets and real bytes."""

from __future__ import annotations

import secrets

import httpx
import pytest

from app.platform.storage import InvalidKey, ObjectNotFound

ALL_BYTES = bytes(range(256)) * 40


def new_uid() -> str:
    return f"user-{secrets.token_hex(6)}"


async def test_put_then_get_returns_same_bytes(storage) -> None:
    key = f"{new_uid()}/file-1"

    info = await storage.put(key, ALL_BYTES, content_type="application/octet-stream")

    assert info.key == key
    assert info.size == len(ALL_BYTES)
    assert info.content_type == "application/octet-stream"
    assert await storage.get(key) == ALL_BYTES


async def test_info_returns_size_and_content_type(storage) -> None:
    key = f"{new_uid()}/file-1"
    await storage.put(key, b"\x89PNG\r\n\x1a\n", content_type="image/png")

    info = await storage.info(key)

    assert info.key == key
    assert info.size == 8
    assert info.content_type == "image/png"


async def test_empty_object_round_trips(storage) -> None:
    key = f"{new_uid()}/empty"

    await storage.put(key, b"", content_type="text/plain")

    assert await storage.get(key) == b""
    assert (await storage.info(key)).size == 0


async def test_signed_upload_url_cannot_replace_an_object(storage) -> None:
    key = f"{new_uid()}/file-1"
    url = await storage.signed_upload_url(key, expires_in_seconds=60, content_type="text/plain", max_bytes=100)
    async with httpx.AsyncClient() as client:
        first = await client.put(url, content=b"accepted bytes", headers={"content-type": "text/plain"})
        second = await client.put(url, content=b"replacement", headers={"content-type": "text/plain"})
        await storage.delete([key])
        after_delete = await client.put(url, content=b"uploaded again", headers={"content-type": "text/plain"})

    assert first.status_code == 200
    # Local replies 409, and Supabase 400 with statusCode "409" in the body.
    assert second.status_code in (400, 409)
    assert "409" in second.text or second.status_code == 409
    assert after_delete.status_code == 200
    assert await storage.get(key) == b"uploaded again"


async def test_put_replaces_existing_object(storage) -> None:
    key = f"{new_uid()}/file-1"
    await storage.put(key, b"first version", content_type="text/plain")

    await storage.put(key, b"second", content_type="application/pdf")

    assert await storage.get(key) == b"second"
    info = await storage.info(key)
    assert info.size == 6
    assert info.content_type == "application/pdf"


@pytest.mark.parametrize("operation", ["get", "info"])
async def test_missing_key_raises_not_found(storage, operation: str) -> None:
    with pytest.raises(ObjectNotFound):
        await getattr(storage, operation)(f"{new_uid()}/missing")


async def test_delete_removes_objects_and_ignores_missing(storage) -> None:
    uid = new_uid()
    await storage.put(f"{uid}/a", b"a", content_type="text/plain")
    await storage.put(f"{uid}/b", b"b", content_type="text/plain")

    await storage.delete([f"{uid}/a", f"{uid}/missing"])

    with pytest.raises(ObjectNotFound):
        await storage.get(f"{uid}/a")
    assert await storage.get(f"{uid}/b") == b"b"


async def test_list_keys_finds_derived_keys_under_prefix(storage) -> None:
    uid = new_uid()
    await storage.put(f"{uid}/file-1", b"1", content_type="image/png")
    await storage.put(f"{uid}/file-1/thumbnail", b"t", content_type="image/webp")
    await storage.put(f"{uid}/file-2", b"2", content_type="text/plain")
    # A sibling whose name starts with the prefix must not be listed.
    await storage.put(f"{uid}0/file-3", b"3", content_type="text/plain")

    keys = await storage.list_keys(uid)

    assert keys == [f"{uid}/file-1", f"{uid}/file-1/thumbnail", f"{uid}/file-2"]


async def test_list_keys_of_unknown_prefix_is_empty(storage) -> None:
    assert await storage.list_keys(new_uid()) == []


async def test_deleting_listed_keys_empties_prefix(storage) -> None:
    uid = new_uid()
    await storage.put(f"{uid}/file-1", b"1", content_type="text/plain")
    await storage.put(f"{uid}/file-1/thumbnail", b"t", content_type="image/png")

    await storage.delete(await storage.list_keys(uid))

    assert await storage.list_keys(uid) == []


@pytest.mark.parametrize("key", ["", "../x", "a/../b", "/abs", "a/", "a//b", "a\\b", "a\x00b", "a/./b", "ünï/x", "a b/c", "a?b"])
async def test_invalid_key_is_rejected(storage, key: str) -> None:
    with pytest.raises(InvalidKey):
        await storage.put(key, b"x", content_type="text/plain")
    with pytest.raises(InvalidKey):
        await storage.get(key)


async def test_signed_download_url_serves_object(storage) -> None:
    key = f"{new_uid()}/file-1"
    await storage.put(key, ALL_BYTES, content_type="image/png")

    url = await storage.signed_download_url(key, expires_in_seconds=60, file_name="photo.png", inline=True)
    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert url.startswith("http://127.0.0.1:")
    assert reply.status_code == 200
    assert reply.content == ALL_BYTES
    assert reply.headers["content-type"] == "image/png"


async def test_download_url_of_missing_key_raises(storage) -> None:
    with pytest.raises(ObjectNotFound):
        await storage.signed_download_url(f"{new_uid()}/missing", expires_in_seconds=60, file_name="a", inline=True)


async def test_signed_download_url_serves_range(storage) -> None:
    key = f"{new_uid()}/file-1"
    await storage.put(key, b"0123456789", content_type="text/plain")

    url = await storage.signed_download_url(key, expires_in_seconds=60, file_name="digits.txt", inline=True)
    async with httpx.AsyncClient() as client:
        reply = await client.get(url, headers={"range": "bytes=2-5"})

    assert reply.status_code == 206
    assert reply.content == b"2345"
    assert reply.headers["content-range"] == "bytes 2-5/10"


async def test_attachment_url_names_file(storage) -> None:
    key = f"{new_uid()}/file-1"
    await storage.put(key, b"%PDF-1.7", content_type="application/pdf")

    url = await storage.signed_download_url(key, expires_in_seconds=60, file_name="report.pdf", inline=False)
    async with httpx.AsyncClient() as client:
        reply = await client.get(url)

    assert reply.status_code == 200
    disposition = reply.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''report.pdf" in disposition


async def test_signed_upload_url_takes_put(storage) -> None:
    key = f"{new_uid()}/file-1"
    data = ALL_BYTES[:3000]

    url = await storage.signed_upload_url(key, expires_in_seconds=60, content_type="image/png", max_bytes=4096)
    async with httpx.AsyncClient() as client:
        reply = await client.put(url, content=data, headers={"content-type": "image/png"})

    assert url.startswith("http://127.0.0.1:")
    assert reply.status_code == 200
    assert await storage.get(key) == data
    info = await storage.info(key)
    assert info.size == len(data)
    assert info.content_type == "image/png"
