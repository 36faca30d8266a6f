"""Files on SQLite and Postgres: the upload gate and revoked upload keys, the limits on calls
that buffer whole files, concurrent renames with one etag, streams shorter than declared,
thumbnail download names and the quota charge of processed copies.

The helpers come from test_logic.py, which tests the ordinary flows.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from functions.events.v1 import events_pb2
from PIL import Image
from sqlalchemy import select

from app.files import concurrency, logic, store
from app.files.concurrency import UploadSlots
from app.files.logic import UploadMetadata
from app.files.model import File, FileStatus, RevokedUploadRow, uid_key_segment
from app.platform.context import Principal
from app.platform.db import Database
from app.platform.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidInput,
    ResourceExhausted,
)
from app.platform.events import record_event
from app.platform.storage.local import LocalStorage
from app.platform.storage.port import ObjectStorage
from tests.integration.files.test_logic import (
    TEXT,
    completed,
    files_for,
    new_principal,
    object_exists,
    relay_files_events,
    stream,
    uploaded,
)
from tests.support.files import png_bytes


async def revoked_delete_time(database: Database, key: str) -> datetime | None:
    async with database.unit_of_work() as session:
        return await session.scalar(select(RevokedUploadRow.delete_time).where(RevokedUploadRow.key == key))


def after_urls_end(file: File) -> datetime:
    return logic.upload_url_end_time(file) + timedelta(seconds=1)


# The upload gate.


async def test_gate_accepts_pending_upload_key(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage), new_principal()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), "")

    assert await files.accepts_upload(file.keys.original)
    assert not await files.accepts_upload(file.keys.original, now=file.upload_expire_time)
    assert not await files.accepts_upload(file.keys.thumbnail)
    assert not await files.accepts_upload(f"{uid_key_segment(principal.uid)}-other/{file.id}")


@pytest.mark.parametrize("key", ["", "/", "abc", "a/b/c", "uid/" + "G" * 32, "uid/" + "0" * 31, "/" + "0" * 32, "\x00/\x00"])
async def test_gate_rejects_malformed_key(database: Database, local_storage: LocalStorage, key: str) -> None:
    files = files_for(database, local_storage)

    assert await files.accepts_upload(key) is False


async def test_gate_rejects_completed_and_deleted_files(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage), new_principal()
    done = await completed(files, principal, TEXT)
    deleted, _ = await files.create_upload(principal, "gone.txt", "text/plain", len(TEXT), "")
    await files.delete_file(principal, deleted.id)

    assert not await files.accepts_upload(done.keys.original)
    assert not await files.accepts_upload(deleted.keys.original)


# Revoked upload keys: bytes PUT after the file is gone are deleted once every URL has expired.


async def test_put_after_delete_is_swept_once_urls_expire(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), "")
    await files.delete_file(principal, file.id)
    # A Supabase URL still takes this PUT, and a local one can race the delete.
    await storage.put(file.keys.original, TEXT, content_type="text/plain")

    await files.sweep_abandoned_uploads(now=logic.upload_url_end_time(file) - timedelta(seconds=1))
    kept_before_expiry = await object_exists(storage, file.keys.original)
    await files.sweep_abandoned_uploads(now=after_urls_end(file))

    assert kept_before_expiry
    assert not await object_exists(storage, file.keys.original)
    assert await revoked_delete_time(database, file.keys.original) is None


async def test_revocation_outlives_supabase_url_lifetime(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), "")

    await files.delete_file(principal, file.id)

    delete_time = await revoked_delete_time(database, file.keys.original)
    assert delete_time is not None
    assert delete_time >= file.create_time + timedelta(hours=2)
    assert delete_time == logic.upload_url_end_time(file)


async def test_swept_upload_key_is_revoked(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), "")
    expired = file.upload_expire_time + timedelta(seconds=1)

    await files.sweep_abandoned_uploads(now=expired)
    await storage.put(file.keys.original, TEXT, content_type="text/plain")
    await files.sweep_abandoned_uploads(now=after_urls_end(file))

    assert not await object_exists(storage, file.keys.original)


async def test_user_deleted_revokes_upload_keys(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    pending = await uploaded(files, principal, TEXT)
    async with database.unit_of_work() as session:
        await record_event(session, events_pb2.UserDeleted(uid=principal.uid))

    await relay_files_events(database, storage)
    await storage.put(pending.keys.original, TEXT, content_type="text/plain")
    await files.sweep_abandoned_uploads(now=after_urls_end(pending))

    assert not await object_exists(storage, pending.keys.original)
    assert await storage.list_keys(uid_key_segment(principal.uid)) == []


# Calls that buffer a whole file.


class Gate:
    """A point that streams and storage reads wait at until the test opens it."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def wait(self) -> None:
        self.reached.set()
        await self.opened.wait()


async def held_stream(gate: Gate, data: bytes) -> AsyncIterator[bytes]:
    # The first byte comes at once, because an Upload takes its slot only when bytes arrive.
    yield data[:1]
    await gate.wait()
    yield data[1:]


async def silent_stream(gate: Gate, *chunks: bytes) -> AsyncIterator[bytes]:
    """Yield `chunks`, then wait at the gate and end, as a client that stops sending does."""
    for chunk in chunks:
        yield chunk
    await gate.wait()


async def empty_chunks_forever() -> AsyncIterator[bytes]:
    while True:
        await asyncio.sleep(0.05)
        yield b""


class HeldReads:
    """An object storage whose `get` waits at a gate; everything else goes to the wrapped storage."""

    def __init__(self, storage: ObjectStorage, gate: Gate) -> None:
        self._storage = storage
        self._gate = gate

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)

    async def get(self, key: str) -> bytes:
        await self._gate.wait()
        return await self._storage.get(key)


def text_metadata(size: int | None = None) -> UploadMetadata:
    return UploadMetadata(name="notes.txt", content_type="text/plain", size=size, sha256="")


async def start_held_uploads(files: logic.Files, principals: list[Principal], gate: Gate) -> list[asyncio.Task[File]]:
    tasks = [asyncio.create_task(files.upload(principal, text_metadata(), held_stream(gate, TEXT))) for principal in principals]
    await gate.reached.wait()
    # The first task at the gate has its slot. The short sleep lets the other tasks reach the gate too.
    await asyncio.sleep(0.05)
    return tasks


async def test_upload_past_user_limit_fails_at_once(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage, max_concurrent_uploads_per_user=2), new_principal()
    gate = Gate()
    held_uploads = await start_held_uploads(files, [principal, principal], gate)

    with pytest.raises(ResourceExhausted) as raised:
        await files.upload(principal, text_metadata(), stream(TEXT))
    other = await files.upload(new_principal(), text_metadata(), stream(TEXT))
    gate.opened.set()
    finished = await asyncio.gather(*held_uploads)

    assert raised.value.reason == "TOO_MANY_UPLOADS"
    assert "2 of 2 per user" in raised.value.message
    assert other.status is FileStatus.READY
    assert [file.status for file in finished] == [FileStatus.READY, FileStatus.READY]
    assert files.upload_slots.in_use == 0


async def test_upload_past_process_limit_fails_at_once(database: Database, local_storage: LocalStorage) -> None:
    files = files_for(database, local_storage, max_concurrent_uploads_per_user=1, max_concurrent_uploads=2)
    gate = Gate()
    held_uploads = await start_held_uploads(files, [new_principal(), new_principal()], gate)

    with pytest.raises(ResourceExhausted) as raised:
        await files.upload(new_principal(), text_metadata(), stream(TEXT))
    gate.opened.set()
    await asyncio.gather(*held_uploads)

    assert raised.value.reason == "SERVER_UPLOADS_BUSY"
    assert "2 of 2" in raised.value.message


async def test_failed_uploads_give_slots_back(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage, max_concurrent_uploads_per_user=1), new_principal()

    for _ in range(3):
        with pytest.raises(InvalidInput):
            await files.upload(principal, text_metadata(size=len(TEXT) + 1), stream(TEXT))
    file = await files.upload(principal, text_metadata(), stream(TEXT))

    assert file.status is FileStatus.READY
    assert files.upload_slots.in_use == 0


async def test_second_completion_of_one_file_is_aborted(database: Database, local_storage: LocalStorage) -> None:
    gate = Gate()
    files, principal = files_for(database, HeldReads(local_storage, gate)), new_principal()
    file = await uploaded(files, principal, TEXT)
    first = asyncio.create_task(files.complete_upload(principal, file.id))
    await gate.reached.wait()

    with pytest.raises(Aborted) as raised:
        await files.complete_upload(principal, file.id)
    gate.opened.set()
    done = await first

    assert "a completion of file" in raised.value.message
    assert done.status is FileStatus.READY
    assert (await files.complete_upload(principal, file.id)).status is FileStatus.READY


async def test_metadata_only_uploads_hold_no_slots(database: Database, local_storage: LocalStorage) -> None:
    # The reported case: four users open two Upload streams each, send the metadata and stop.
    files = files_for(database, local_storage, max_concurrent_uploads_per_user=2, max_concurrent_uploads=8)
    gate = Gate()
    idle = [
        asyncio.create_task(files.upload(principal, text_metadata(), silent_stream(gate)))
        for principal in [new_principal() for _ in range(4)]
        for _ in range(2)
    ]
    await gate.reached.wait()
    await asyncio.sleep(0.05)

    in_use = files.upload_slots.in_use
    other = new_principal()
    file = await uploaded(files, other, TEXT)
    done = await files.complete_upload(other, file.id)
    streamed = await files.upload(other, text_metadata(), stream(TEXT))
    gate.opened.set()
    ended = await asyncio.gather(*idle, return_exceptions=True)

    assert in_use == 0
    assert done.status is FileStatus.READY
    assert streamed.status is FileStatus.READY
    assert all(isinstance(error, InvalidInput) for error in ended)
    assert files.upload_slots.in_use == 0


async def test_stalled_upload_ends_and_frees_slot(
    database: Database, local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(concurrency, "UPLOAD_CHUNK_IDLE_SECONDS", 0.3)
    files, principal = files_for(database, local_storage, max_concurrent_uploads_per_user=1), new_principal()
    gate = Gate()
    stalled = asyncio.create_task(files.upload(principal, text_metadata(), silent_stream(gate, TEXT[:1])))
    await gate.reached.wait()
    in_use_while_stalled = files.upload_slots.in_use

    started = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceeded) as raised:
        await asyncio.wait_for(stalled, 10)
    waited = asyncio.get_running_loop().time() - started
    after = await files.upload(principal, text_metadata(), stream(TEXT))

    assert in_use_while_stalled == 1
    assert raised.value.reason == "UPLOAD_STALLED"
    assert raised.value.message == (
        "upload stream stalled: no chunk arrived for 0.3 seconds; send the chunks without pauses"
    )
    assert waited < 10
    assert after.status is FileStatus.READY
    assert files.upload_slots.in_use == 0
    async with database.unit_of_work() as session:
        assert (await store.get_usage(session, principal.uid)).count == 1


async def test_trickling_upload_ends_too_slow(
    database: Database, local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(concurrency, "UPLOAD_MIN_SECONDS", 0.5)
    files, principal = files_for(database, local_storage), new_principal()

    async def trickle() -> AsyncIterator[bytes]:
        while True:
            yield b"x"
            await asyncio.sleep(0.05)

    with pytest.raises(DeadlineExceeded) as raised:
        await asyncio.wait_for(files.upload(principal, text_metadata(), trickle()), 10)

    assert raised.value.reason == "UPLOAD_TOO_SLOW"
    assert files.upload_slots.in_use == 0


async def test_metadata_only_upload_times_out(
    database: Database, local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(concurrency, "UPLOAD_CHUNK_IDLE_SECONDS", 0.3)
    files = files_for(database, local_storage)

    with pytest.raises(DeadlineExceeded) as raised:
        await asyncio.wait_for(files.upload(new_principal(), text_metadata(), silent_stream(Gate())), 10)

    assert raised.value.reason == "UPLOAD_STALLED"
    assert files.upload_slots.in_use == 0


async def test_empty_chunks_do_not_keep_upload_alive(
    database: Database, local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(concurrency, "UPLOAD_CHUNK_IDLE_SECONDS", 0.3)
    files = files_for(database, local_storage)

    with pytest.raises(DeadlineExceeded) as raised:
        await asyncio.wait_for(files.upload(new_principal(), text_metadata(), empty_chunks_forever()), 10)

    assert raised.value.reason == "UPLOAD_STALLED"
    assert files.upload_slots.in_use == 0


def test_upload_slots_reject_zero_limits() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        UploadSlots(max_per_user=0)


# Renames.


async def test_concurrent_renames_with_one_etag_one_wins(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage), new_principal()
    done = await completed(files, principal, TEXT)

    results = await asyncio.gather(
        *(files.rename_file(principal, done.id, f"name-{index}.txt", done.etag) for index in range(30)),
        return_exceptions=True,
    )

    renamed = [result for result in results if isinstance(result, File)]
    aborted = [result for result in results if isinstance(result, Aborted)]
    assert len(renamed) == 1
    assert len(aborted) == 29
    assert (await files.get_file(principal, done.id)).name == renamed[0].name


async def test_rename_without_etag_always_applies(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage), new_principal()
    done = await completed(files, principal, TEXT)

    results = await asyncio.gather(*(files.rename_file(principal, done.id, f"n{index}.txt", "") for index in range(5)))

    assert len(results) == 5
    assert (await files.get_file(principal, done.id)).version == done.version + 5


# Upload streams shorter than declared.


async def test_stream_shorter_than_declared_is_invalid(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()

    with pytest.raises(InvalidInput) as raised:
        await files.upload(principal, text_metadata(size=300), stream(b"hello"))

    assert [violation.field for violation in raised.value.violations] == ["size"]
    assert "declared 300, received 5" in raised.value.violations[0].description
    async with database.unit_of_work() as session:
        assert (await store.get_usage(session, principal.uid)).count == 0


# Thumbnail names.


@pytest.mark.parametrize(
    ("name", "content_type", "expected"),
    [
        ("red.png", "image/jpeg", "red.thumbnail.jpg"),
        ("red.png", "image/png", "red.thumbnail.png"),
        ("holiday.photo.JPEG", "image/png", "holiday.photo.thumbnail.png"),
        ("scan", "image/jpeg", "scan.thumbnail.jpg"),
        (".hidden", "image/jpeg", ".hidden.thumbnail.jpg"),
    ],
)
def test_thumbnail_name(name: str, content_type: str, expected: str) -> None:
    assert logic.thumbnail_name(name, content_type) == expected


async def test_thumbnail_url_names_thumbnail_type(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage), new_principal()
    done = await completed(files, principal, png_bytes(16, 16), "image/png", name="red.png")
    await relay_files_events(database, local_storage)

    thumbnail = await files.get_download_url(principal, done.id, thumbnail=True, inline=False)
    original = await files.get_download_url(principal, done.id, thumbnail=False, inline=False)

    assert parse_qs(urlsplit(thumbnail.url).query)["name"] == ["red.thumbnail.jpg"]
    assert thumbnail.content_type == "image/jpeg"
    assert parse_qs(urlsplit(original.url).query)["name"] == ["red.png"]


# The quota charge of processed copies.


def low_quality_jpeg(side: int = 64) -> bytes:
    """Encode noise at JPEG quality 1, an image whose processed copies are not much smaller than it."""
    noise = random.Random(7).randbytes(side * side * 3)
    output = io.BytesIO()
    Image.frombytes("RGB", (side, side), noise).save(output, "JPEG", quality=1)
    return output.getvalue()


async def test_processed_copies_count_against_quota(database: Database, storage: ObjectStorage) -> None:
    jpeg = low_quality_jpeg()
    # Without the charge of the copies, one more byte would fit.
    files, principal = files_for(database, storage, quota_bytes=len(jpeg) + 1), new_principal()
    done = await completed(files, principal, jpeg, "image/jpeg", name="noise.jpg")

    await relay_files_events(database, storage)

    processed = await files.get_file(principal, done.id)
    stripped = await storage.get(done.keys.stripped)
    thumbnail = await storage.get(done.keys.thumbnail)
    async with database.unit_of_work() as session:
        usage = await store.get_usage(session, principal.uid)
    assert processed.status is FileStatus.READY
    assert processed.processed_bytes == len(stripped) + len(thumbnail)
    assert usage.bytes == len(jpeg) + processed.processed_bytes
    with pytest.raises(ResourceExhausted) as raised:
        await files.create_upload(principal, "one.txt", "text/plain", 1, "")
    assert raised.value.reason == "QUOTA_BYTES_EXCEEDED"
