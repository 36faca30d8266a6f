"""Files on SQLite and Postgres, over the local adapter and the Supabase adapter (against the
Storage stand-in): reservations, completion checks, streamed uploads, quotas, access, listing,
renames, deletion, image processing, the sweep of abandoned uploads and UserDeleted.

A test puts the uploaded bytes with the adapter itself, where a client would PUT them to the
signed URL; tests/e2e/test_files.py sends them over HTTP. The databases and storages are
shared by the tests of a session, so each test uses its own uids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from functions.events.v1 import events_pb2
from sqlalchemy import func, select

from app.files import logic, store
from app.files.events import file_consumers
from app.files.logic import FileLimits, Files, UploadMetadata
from app.files.model import File, FileKeys, FileRow, FileStatus, uid_key_segment
from app.platform.context import Principal
from app.platform.db import Database
from app.platform.errors import (
    Aborted,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from app.platform.events import EventRelay, OutboxEventRow, record_event
from app.platform.storage.local import LocalStorage
from app.platform.storage.port import ObjectNotFound, ObjectStorage
from tests.support.files import (
    bomb_png,
    exif_of,
    gif_bytes,
    has_gps,
    jpeg_with_exif,
    pdf_bytes,
    png_bytes,
    webp_bytes,
)
from tests.support.supabase_storage import SupabaseStorageStandIn

TEXT = b"plain text, nothing more\n"
LIMITS = FileLimits(
    max_bytes=64 * 1024,
    quota_bytes=256 * 1024,
    quota_count=20,
    allowed_types=frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf", "text/plain"}),
    upload_url_ttl_seconds=60,
    download_url_ttl_seconds=30,
)


def new_principal(*, admin: bool = False) -> Principal:
    return Principal(uid=f"files-{secrets.token_hex(6)}", roles=("admin",) if admin else ())


def files_for(database: Database, storage: ObjectStorage, **limits: object) -> Files:
    return Files(database, storage, dataclasses.replace(LIMITS, **limits))


async def uploaded(
    files: Files, principal: Principal, data: bytes, content_type: str = "text/plain", *, name: str = "notes.txt", put_type: str = ""
) -> File:
    """Reserve a file and put its bytes, as a client PUT to the upload URL would."""
    file, _ = await files.create_upload(principal, name, content_type, len(data), "")
    await files.storage.put(file.keys.original, data, content_type=put_type or content_type)
    return file


async def completed(files: Files, principal: Principal, data: bytes, content_type: str = "text/plain", **options: str) -> File:
    file = await uploaded(files, principal, data, content_type, **options)
    return await files.complete_upload(principal, file.id)


async def stream(*chunks: bytes, consumed: list[int] | None = None) -> AsyncIterator[bytes]:
    for index, chunk in enumerate(chunks):
        if consumed is not None:
            consumed.append(index)
        yield chunk


async def object_exists(storage: ObjectStorage, key: str) -> bool:
    try:
        await storage.info(key)
    except ObjectNotFound:
        return False
    return True


async def events_of(database: Database, event_type: str, file_id: str) -> int:
    async with database.unit_of_work() as session:
        rows = (await session.execute(select(OutboxEventRow).where(OutboxEventRow.type == event_type))).scalars().all()
    messages = [getattr(events_pb2, event_type.rsplit(".", 1)[1]).FromString(row.payload) for row in rows]
    return sum(1 for message in messages if message.file_id == file_id)


async def relay_files_events(database: Database, storage: ObjectStorage) -> None:
    relay = EventRelay(database, file_consumers(storage))
    await relay.run_once()


# Reservation and completion.


async def test_text_upload_becomes_ready(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()

    file, target = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), "")
    await storage.put(file.keys.original, TEXT, content_type="text/plain")
    done = await files.complete_upload(principal, file.id)

    assert file.status is FileStatus.PENDING
    assert target.headers == {"content-type": "text/plain"}
    assert target.expire_time == file.create_time + timedelta(seconds=LIMITS.upload_url_ttl_seconds)
    assert target.url.startswith("http://127.0.0.1:")
    assert done.status is FileStatus.READY
    assert done.sha256 == hashlib.sha256(TEXT).hexdigest()
    assert done.etag != file.etag
    assert file.keys.original == f"{principal.uid}/{file.id}"
    assert await events_of(database, "functions.events.v1.FileUploaded", file.id) == 1


async def test_complete_upload_twice_returns_same_file(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file = await uploaded(files, principal, TEXT)

    first = await files.complete_upload(principal, file.id)
    second = await files.complete_upload(principal, file.id)

    assert second == first
    assert await events_of(database, "functions.events.v1.FileUploaded", file.id) == 1


async def test_complete_before_put_is_failed_precondition(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), "")

    with pytest.raises(FailedPrecondition) as raised:
        await files.complete_upload(principal, file.id)

    assert raised.value.reason == "UPLOAD_MISSING"
    assert "upload the bytes first" in raised.value.message


async def test_text_declared_png_is_rejected_and_discarded(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file = await uploaded(files, principal, TEXT, "image/png", name="picture.png")

    with pytest.raises(InvalidInput) as raised:
        await files.complete_upload(principal, file.id)

    assert [v.field for v in raised.value.violations] == ["content_type"]
    assert "declared image/png, but the bytes are text/plain" in raised.value.message
    assert not await object_exists(storage, file.keys.original)
    assert (await files.get_file(principal, file.id)).status is FileStatus.PENDING


async def test_correct_bytes_after_rejected_ones_complete(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    png = png_bytes()
    file, _ = await files.create_upload(principal, "dot.png", "image/png", len(png), "")
    await storage.put(file.keys.original, b"x" * len(png), content_type="image/png")
    with pytest.raises(InvalidInput):
        await files.complete_upload(principal, file.id)

    await storage.put(file.keys.original, png, content_type="image/png")
    done = await files.complete_upload(principal, file.id)

    assert done.status is FileStatus.PROCESSING


async def test_one_pixel_png_is_accepted_as_png(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()

    done = await completed(files, principal, png_bytes(), "image/png", name="dot.png")

    assert done.content_type == "image/png"
    assert done.status is FileStatus.PROCESSING
    assert (await storage.info(done.keys.original)).content_type == "image/png"


async def test_put_with_other_type_is_stored_as_declared(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()

    done = await completed(files, principal, TEXT, "text/plain", put_type="text/html")

    assert (await storage.info(done.keys.original)).content_type == "text/plain"


@pytest.mark.parametrize(
    ("declared_size", "sha256", "field"),
    [
        (len(TEXT) + 1, "", "size"),
        (len(TEXT), "0" * 64, "sha256"),
    ],
)
async def test_complete_rejects_size_and_hash_mismatch(
    database: Database, storage: ObjectStorage, declared_size: int, sha256: str, field: str
) -> None:
    files, principal = files_for(database, storage), new_principal()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", declared_size, sha256)
    await storage.put(file.keys.original, TEXT, content_type="text/plain")

    with pytest.raises(InvalidInput) as raised:
        await files.complete_upload(principal, file.id)

    assert [v.field for v in raised.value.violations] == [field]
    assert not await object_exists(storage, file.keys.original)


async def test_declared_sha256_is_accepted_in_upper_case(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    digest = hashlib.sha256(TEXT).hexdigest()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), digest.upper())
    await storage.put(file.keys.original, TEXT, content_type="text/plain")

    done = await files.complete_upload(principal, file.id)

    assert done.sha256 == digest


async def test_expired_upload_cannot_complete(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file = await uploaded(files, principal, TEXT)

    with pytest.raises(FailedPrecondition) as raised:
        await files.complete_upload(principal, file.id, now=file.upload_expire_time)

    assert raised.value.reason == "UPLOAD_EXPIRED"


@pytest.mark.parametrize(
    ("name", "content_type", "size", "sha256", "fields"),
    [
        ("", "text/plain", 1, "", ["name"]),
        ("   ", "text/plain", 1, "", ["name"]),
        ("n" * 256, "text/plain", 1, "", ["name"]),
        ("nul\x00.txt", "text/plain", 1, "", ["name"]),
        ("line\nbreak.txt", "text/plain", 1, "", ["name"]),
        ("a.txt", "text", 1, "", ["content_type"]),
        ("a.html", "text/html", 1, "", ["content_type"]),
        ("a.txt", "text/plain", 0, "", ["size"]),
        ("a.txt", "text/plain", -5, "", ["size"]),
        ("a.txt", "text/plain", 1, "abc", ["sha256"]),
        ("", "", 0, "zz", ["name", "content_type", "size", "sha256"]),
    ],
)
async def test_create_upload_rejects_invalid_fields(
    database: Database, storage: ObjectStorage, name: str, content_type: str, size: int, sha256: str, fields: list[str]
) -> None:
    files = files_for(database, storage)

    with pytest.raises(InvalidInput) as raised:
        await files.create_upload(new_principal(), name, content_type, size, sha256)

    assert [v.field for v in raised.value.violations] == fields


async def test_any_printable_name_is_metadata_only(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    name = '../../etc/passwd "quoted" ünïcødé 🙂 \\ ; %00.txt'

    done = await completed(files, principal, TEXT, name=name)

    assert done.name == name
    assert done.keys.original == f"{principal.uid}/{done.id}"


async def test_uid_with_other_characters_gets_hashed_key(database: Database, storage: ObjectStorage) -> None:
    files = files_for(database, storage)
    principal = Principal(uid=f"odd uid/{secrets.token_hex(4)}")

    done = await completed(files, principal, TEXT)

    assert done.keys.original.startswith("x.")
    assert done.keys.original.split("/")[0] == uid_key_segment(principal.uid)
    assert await object_exists(storage, done.keys.original)


# Limits and quotas.


async def test_max_size_boundary(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, max_bytes=len(TEXT)), new_principal()

    done = await completed(files, principal, TEXT)
    with pytest.raises(ResourceExhausted) as raised:
        await files.create_upload(principal, "big.txt", "text/plain", len(TEXT) + 1, "")

    assert done.status is FileStatus.READY
    assert raised.value.reason == "FILE_TOO_LARGE"
    assert f"maximum of {len(TEXT)} bytes" in raised.value.message
    assert f"got {len(TEXT) + 1} bytes" in raised.value.message


async def test_put_larger_than_max_is_rejected_on_completion(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, max_bytes=len(TEXT)), new_principal()
    file, _ = await files.create_upload(principal, "notes.txt", "text/plain", len(TEXT), "")
    await storage.put(file.keys.original, TEXT + b"!", content_type="text/plain")

    with pytest.raises(ResourceExhausted):
        await files.complete_upload(principal, file.id)

    assert not await object_exists(storage, file.keys.original)


async def test_quota_bytes_counts_pending_reservations(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, quota_bytes=100), new_principal()
    await files.create_upload(principal, "a.txt", "text/plain", 60, "")

    with pytest.raises(ResourceExhausted) as raised:
        await files.create_upload(principal, "b.txt", "text/plain", 41, "")

    assert raised.value.reason == "QUOTA_BYTES_EXCEEDED"
    assert raised.value.message == "storage quota exceeded: 60 of 100 bytes used, 41 more requested"


async def test_quota_count_is_enforced(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, quota_count=2), new_principal()
    await files.create_upload(principal, "a.txt", "text/plain", 1, "")
    await files.create_upload(principal, "b.txt", "text/plain", 1, "")

    with pytest.raises(ResourceExhausted) as raised:
        await files.create_upload(principal, "c.txt", "text/plain", 1, "")

    assert raised.value.reason == "QUOTA_COUNT_EXCEEDED"
    assert raised.value.message == "file count quota exceeded: 2 of 2 files used, 1 more requested"


async def test_concurrent_reservations_never_pass_quota(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, quota_count=3), new_principal()

    results = await asyncio.gather(
        *(files.create_upload(principal, f"{index}.txt", "text/plain", 1, "") for index in range(8)),
        return_exceptions=True,
    )

    assert sum(1 for result in results if isinstance(result, tuple)) == 3
    assert all(isinstance(result, (tuple, ResourceExhausted)) for result in results)
    async with database.unit_of_work() as session:
        assert (await store.get_usage(session, principal.uid)).count == 3


async def test_deleting_frees_quota(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, quota_count=1), new_principal()
    file, _ = await files.create_upload(principal, "a.txt", "text/plain", 1, "")

    await files.delete_file(principal, file.id)
    again, _ = await files.create_upload(principal, "b.txt", "text/plain", 1, "")

    assert again.status is FileStatus.PENDING


# Streamed uploads.


async def test_streamed_upload_is_ready(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    metadata = UploadMetadata(name="notes.txt", content_type="text/plain", size=len(TEXT), sha256="")

    done = await files.upload(principal, metadata, stream(TEXT[:5], TEXT[5:]))

    assert done.status is FileStatus.READY
    assert done.size == len(TEXT)
    assert await storage.get(done.keys.original) == TEXT


async def test_streamed_upload_without_size(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    metadata = UploadMetadata(name="doc.pdf", content_type="application/pdf", size=None, sha256="")

    done = await files.upload(principal, metadata, stream(pdf_bytes()))

    assert done.status is FileStatus.READY
    assert done.content_type == "application/pdf"


async def test_streamed_upload_stops_reading_past_max(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, max_bytes=10), new_principal()
    metadata = UploadMetadata(name="notes.txt", content_type="text/plain", size=None, sha256="")
    consumed: list[int] = []

    with pytest.raises(ResourceExhausted) as raised:
        await files.upload(principal, metadata, stream(b"a" * 6, b"b" * 6, b"c" * 6, consumed=consumed))

    assert consumed == [0, 1]
    assert raised.value.reason == "FILE_TOO_LARGE"
    async with database.unit_of_work() as session:
        assert (await store.get_usage(session, principal.uid)).count == 0


async def test_streamed_upload_stops_past_declared_size(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    metadata = UploadMetadata(name="notes.txt", content_type="text/plain", size=4, sha256="")

    with pytest.raises(InvalidInput) as raised:
        await files.upload(principal, metadata, stream(b"abc", b"def"))

    assert [v.field for v in raised.value.violations] == ["size"]


async def test_empty_stream_is_invalid(database: Database, storage: ObjectStorage) -> None:
    files = files_for(database, storage)
    metadata = UploadMetadata(name="empty.txt", content_type="text/plain", size=None, sha256="")

    with pytest.raises(InvalidInput) as raised:
        await files.upload(new_principal(), metadata, stream())

    assert [v.field for v in raised.value.violations] == ["chunk"]


async def test_streamed_upload_over_quota_fails(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage, quota_bytes=10), new_principal()
    metadata = UploadMetadata(name="notes.txt", content_type="text/plain", size=None, sha256="")

    with pytest.raises(ResourceExhausted) as raised:
        await files.upload(principal, metadata, stream(b"a" * 8, b"b" * 8))

    assert raised.value.message == "storage quota exceeded: 0 of 10 bytes used, 16 more requested"


# Access.


async def test_other_users_file_is_not_found_without_owner(database: Database, storage: ObjectStorage) -> None:
    files, owner, stranger = files_for(database, storage), new_principal(), new_principal()
    done = await completed(files, owner, TEXT)

    calls = [
        files.get_file(stranger, done.id),
        files.complete_upload(stranger, done.id),
        files.get_download_url(stranger, done.id, thumbnail=False, inline=False),
        files.rename_file(stranger, done.id, "mine.txt", ""),
        files.delete_file(stranger, done.id),
    ]
    for call in calls:
        with pytest.raises(NotFound) as raised:
            await call
        assert raised.value.message == f"file {done.id} not found"
        assert owner.uid not in raised.value.message
    assert (await files.get_file(owner, done.id)).name == done.name


async def test_admin_reaches_other_users_file(database: Database, storage: ObjectStorage) -> None:
    files, owner, admin = files_for(database, storage), new_principal(), new_principal(admin=True)
    done = await completed(files, owner, TEXT)

    seen = await files.get_file(admin, done.id)
    target = await files.get_download_url(admin, done.id, thumbnail=False, inline=True)
    await files.delete_file(admin, done.id)

    assert seen.uid == owner.uid
    assert target.content_type == "text/plain"
    with pytest.raises(NotFound):
        await files.get_file(owner, done.id)


@pytest.mark.parametrize("file_id", ["", "abc", "G" * 32, "0" * 31, "0" * 33])
async def test_malformed_file_id_is_invalid(database: Database, storage: ObjectStorage, file_id: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        await files_for(database, storage).get_file(new_principal(), file_id)

    assert [v.field for v in raised.value.violations] == ["file_id"]


# Listing, renaming, downloading and deleting.


async def test_list_pages_newest_first_with_filters(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    texts = [await completed(files, principal, TEXT, name=f"{index}.txt") for index in range(3)]
    pending, _ = await files.create_upload(principal, "later.pdf", "application/pdf", 10, "")

    first = await files.list_files(principal, 2, "", "", None)
    second = await files.list_files(principal, 2, first.next_page_token, "", None)
    only_text = await files.list_files(principal, 0, "", "TEXT/PLAIN", None)
    only_pending = await files.list_files(principal, 0, "", "", FileStatus.PENDING)

    assert [f.id for f in first.files + second.files] == [pending.id, *reversed([f.id for f in texts])]
    assert second.next_page_token == ""
    assert [f.id for f in only_text.files] == list(reversed([f.id for f in texts]))
    assert [f.id for f in only_pending.files] == [pending.id]


async def test_list_rejects_foreign_page_token(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    for index in range(2):
        await completed(files, principal, TEXT, name=f"{index}.txt")
    page = await files.list_files(principal, 1, "", "", None)

    with pytest.raises(InvalidInput) as other_filters:
        await files.list_files(principal, 1, page.next_page_token, "", FileStatus.READY)
    with pytest.raises(InvalidInput) as garbage:
        await files.list_files(principal, 1, "v1.not-a-token", "", None)

    assert "same content_type and status" in other_filters.value.message
    assert [v.field for v in garbage.value.violations] == ["page_token"]


async def test_rename_checks_etag_and_name(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    done = await completed(files, principal, TEXT)

    renamed = await files.rename_file(principal, done.id, "renamed.txt", done.etag)
    with pytest.raises(Aborted):
        await files.rename_file(principal, done.id, "again.txt", done.etag)
    with pytest.raises(InvalidInput):
        await files.rename_file(principal, done.id, "bad\x07name", "")

    assert renamed.name == "renamed.txt"
    assert renamed.etag != done.etag
    assert renamed.keys == done.keys


async def test_download_needs_ready_file(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    file = await uploaded(files, principal, TEXT)
    done = await completed(files, principal, TEXT)

    with pytest.raises(FailedPrecondition) as pending:
        await files.get_download_url(principal, file.id, thumbnail=False, inline=False)
    with pytest.raises(FailedPrecondition) as thumbnail:
        await files.get_download_url(principal, done.id, thumbnail=True, inline=False)

    assert pending.value.reason == "FILE_NOT_READY"
    assert thumbnail.value.reason == "NO_THUMBNAIL"


async def test_delete_removes_row_objects_and_records_event(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    done = await completed(files, principal, TEXT)

    await files.delete_file(principal, done.id)

    with pytest.raises(NotFound):
        await files.get_file(principal, done.id)
    assert not await object_exists(storage, done.keys.original)
    assert await events_of(database, "functions.events.v1.FileDeleted", done.id) == 1


# Background work: image processing, sweeping and UserDeleted.


async def test_jpeg_processing_strips_exif_and_makes_thumbnail(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    jpeg = jpeg_with_exif(640, 480)
    done = await completed(files, principal, jpeg, "image/jpeg", name="photo.jpg")

    await relay_files_events(database, storage)

    processed = await files.get_file(principal, done.id)
    served = await storage.get(done.keys.stripped)
    thumbnail = await storage.get(done.keys.thumbnail)
    assert processed.status is FileStatus.READY
    assert processed.has_thumbnail
    assert processed.thumbnail_content_type == "image/jpeg"
    assert has_gps(jpeg)
    assert not has_gps(served)
    assert "Make" not in exif_of(served)
    assert max(len(thumbnail), 1) < len(jpeg)
    target = await files.get_download_url(principal, done.id, thumbnail=True, inline=True)
    assert target.content_type == "image/jpeg"


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        ("image/png", png_bytes(40, 30, alpha=True)),
        ("image/gif", gif_bytes(frames=3)),
        ("image/webp", webp_bytes(exif=True)),
    ],
    ids=["png", "gif", "webp"],
)
async def test_other_images_get_thumbnails(database: Database, storage: ObjectStorage, content_type: str, data: bytes) -> None:
    files, principal = files_for(database, storage), new_principal()
    done = await completed(files, principal, data, content_type, name="picture")

    await relay_files_events(database, storage)

    processed = await files.get_file(principal, done.id)
    assert processed.status is FileStatus.READY
    assert processed.has_thumbnail
    assert (await storage.info(done.keys.stripped)).content_type == content_type
    assert await object_exists(storage, done.keys.thumbnail)


@pytest.mark.parametrize(
    "data",
    [
        # A PNG signature followed by garbage passes the sniffer but not Pillow.
        b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8,
        bomb_png(100_000, 100_000),
    ],
    ids=["corrupt", "decompression-bomb"],
)
async def test_unreadable_image_fails_with_reason(database: Database, storage: ObjectStorage, data: bytes) -> None:
    files, principal = files_for(database, storage), new_principal()
    done = await completed(files, principal, data, "image/png", name="broken.png")

    await relay_files_events(database, storage)

    failed = await files.get_file(principal, done.id)
    assert failed.status is FileStatus.FAILED
    assert failed.failure_reason.startswith("the image could not be processed")
    assert not await object_exists(storage, done.keys.original)
    async with database.unit_of_work() as session:
        assert (await store.get_usage(session, principal.uid)).count == 0


async def test_sweep_removes_only_expired_pending_uploads(database: Database, storage: ObjectStorage) -> None:
    files, principal = files_for(database, storage), new_principal()
    abandoned = await uploaded(files, principal, TEXT)
    ready = await completed(files, principal, TEXT)
    later = datetime.now(UTC) + timedelta(seconds=LIMITS.upload_url_ttl_seconds + 1)
    fresh, _ = await files.create_upload(principal, "fresh.txt", "text/plain", 3, "", now=later)

    removed = await files.sweep_abandoned_uploads(now=later)

    assert removed >= 1
    with pytest.raises(NotFound):
        await files.get_file(principal, abandoned.id)
    assert not await object_exists(storage, abandoned.keys.original)
    assert (await files.get_file(principal, ready.id)).status is FileStatus.READY
    assert (await files.get_file(principal, fresh.id)).status is FileStatus.PENDING
    assert await events_of(database, "functions.events.v1.FileDeleted", abandoned.id) == 1


async def test_sweep_removes_stale_partial_objects(database: Database, local_storage: LocalStorage) -> None:
    files, principal = files_for(database, local_storage), new_principal()
    reserved = await files.create_upload(principal, "partial.txt", "text/plain", 3, "")
    path = local_storage.object_path(reserved[0].keys.original)
    stale, stale_file = local_storage.create_temporary(path)
    fresh, fresh_file = local_storage.create_temporary(path)
    stale_file.close()
    fresh_file.close()
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    await files.sweep_abandoned_uploads()

    assert not stale.exists()
    assert fresh.exists()
    fresh.unlink()


async def test_user_deleted_removes_objects_and_rows(database: Database, storage: ObjectStorage) -> None:
    files, deleted, other = files_for(database, storage), new_principal(), new_principal()
    first = await completed(files, deleted, TEXT)
    pending = await uploaded(files, deleted, TEXT)
    other_file = await completed(files, other, TEXT)
    async with database.unit_of_work() as session:
        await record_event(session, events_pb2.UserDeleted(uid=deleted.uid))

    await relay_files_events(database, storage)

    assert await storage.list_keys(deleted.uid) == []
    async with database.unit_of_work() as session:
        rows = await session.scalar(select(func.count()).where(FileRow.uid == deleted.uid))
    assert rows == 0
    assert not await object_exists(storage, first.keys.original)
    assert not await object_exists(storage, pending.keys.original)
    assert await object_exists(storage, other_file.keys.original)


async def test_file_deleted_consumer_removes_leftover_objects(database: Database, storage: ObjectStorage) -> None:
    principal = new_principal()
    keys = FileKeys.of(principal.uid, logic.new_file_id(datetime.now(UTC)))
    for key in keys.all:
        await storage.put(key, TEXT, content_type="text/plain")
    async with database.unit_of_work() as session:
        await record_event(session, events_pb2.FileDeleted(file_id=keys.original.split("/")[1], uid=principal.uid))

    await relay_files_events(database, storage)

    assert await storage.list_keys(principal.uid) == []


async def test_storage_outage_is_unavailable(
    database: Database, supabase_storage: ObjectStorage, supabase_standin: SupabaseStorageStandIn
) -> None:
    files, principal = files_for(database, supabase_storage), new_principal()
    file = await uploaded(files, principal, TEXT)

    supabase_standin.fail_next(1, "503")
    with pytest.raises(Unavailable) as raised:
        await files.complete_upload(principal, file.id)

    assert raised.value.reason == "STORAGE_UNAVAILABLE"
    assert raised.value.message == "file storage unavailable; retry later"
    assert (await files.complete_upload(principal, file.id)).status is FileStatus.READY


async def test_bucket_rejection_is_invalid_argument(
    database: Database, supabase_storage: ObjectStorage, supabase_standin: SupabaseStorageStandIn
) -> None:
    files, principal = files_for(database, supabase_storage), new_principal()
    metadata = UploadMetadata(name="notes.txt", content_type="text/plain", size=None, sha256="")
    supabase_standin.restrict_bucket(allowed_mime_types=["image/*"])
    try:
        with pytest.raises(InvalidInput) as raised:
            await files.upload(principal, metadata, stream(TEXT))
        image = await files.upload(principal, dataclasses.replace(metadata, name="dot.png", content_type="image/png"), stream(png_bytes()))
    finally:
        supabase_standin.restrict_bucket()

    assert [v.field for v in raised.value.violations] == ["file"]
    assert image.content_type == "image/png"
    async with database.unit_of_work() as session:
        assert (await store.get_usage(session, principal.uid)).count == 1
