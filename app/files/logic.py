"""Use cases of files: reserve and complete uploads, stream uploads, read, list, download, rename,
delete, process images and sweep abandoned uploads.

Unlike other domains' logic, `Files` opens its own units of work. A use case mixes database
writes with object storage calls, and those calls must not run inside a transaction, because
one can take seconds and on SQLite an open write transaction blocks every other writer.

A file's life: CreateUpload inserts a PENDING row that already counts against the quota, and
returns a signed upload URL. CompleteUpload reads the uploaded bytes, checks them and marks the
file READY, or PROCESSING for an image, in the transaction that records FileUploaded. The
FileUploaded consumer then stores the image's copy without metadata and its thumbnail and marks
it READY, or FAILED with a reason. A PENDING file whose upload URL expired is removed by
`sweep_abandoned_uploads`.

Removing a file deletes its row and records FileDeleted in one transaction, then deletes its
objects. When storage fails at that point, the FileDeleted consumer deletes them later.

A signed upload URL can outlive its file: Supabase URLs take a PUT for two hours and cannot be
revoked, and a PUT to a local URL can race DeleteFile past the adapter's upload gate. So the
transaction that removes a file also records its upload key in `revoked_uploads`, with a
delete time after the last moment any URL to that key could still be writing. The sweeper
deletes those objects at that time. This costs one row per file removed while its URL may
work, kept for at most that lifetime, and no listing of storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from functions.events.v1 import events_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from app.files import images, store
from app.files.concurrency import (
    DEFAULT_MAX_PER_PROCESS,
    DEFAULT_MAX_PER_USER,
    UploadSlots,
    chunks_in_time,
)
from app.files.model import (
    FAILURE_REASON_MAX_LENGTH,
    FILE_ID_LENGTH,
    NAME_MAX_LENGTH,
    SHA256_LENGTH,
    File,
    FileKeys,
    FileStatus,
    uid_key_segment,
)
from app.files.sniff import normalize_content_type, sniff_content_type
from app.platform import pagination
from app.platform.context import Principal
from app.platform.db import Database
from app.platform.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    shown,
)
from app.platform.events import record_event
from app.platform.storage.port import (
    ObjectNotFound,
    ObjectRejected,
    ObjectStorage,
    StorageError,
)
from app.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
# Expired uploads one sweep removes per unit of work.
SWEEP_BATCH_SIZE = 100
# Partial objects older than this are left by interrupted uploads: a live upload writes far more often.
STALE_TEMPORARY_SECONDS = 3600.0
STORAGE_UNAVAILABLE_MESSAGE = "file storage unavailable; retry later"
# Supabase signs upload URLs for two hours whatever lifetime is requested, and they cannot be
# revoked (SupabaseStorage.signed_upload_url). No adapter's URLs live longer, unless
# FILES_UPLOAD_URL_TTL_SECONDS is set higher.
SUPABASE_UPLOAD_URL_LIFETIME_SECONDS = 2 * 60 * 60
# A PUT that started just before its URL expired may still be writing after the expiry.
# NOTE: this margin is an estimate. A PUT slower than it can still leave an object behind after
# its revoked key was swept.
UPLOAD_PUT_MARGIN_SECONDS = 10 * 60
# Extensions of the thumbnail types, for the name a thumbnail downloads under.
_THUMBNAIL_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
_FILE_ID_PATTERN = re.compile(rf"[0-9a-f]{{{FILE_ID_LENGTH}}}")
_SHA256_PATTERN = re.compile(rf"[0-9a-fA-F]{{{SHA256_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class FileLimits:
    """Sizes, quotas, accepted types and URL lifetimes, from the settings."""

    max_bytes: int
    quota_bytes: int
    quota_count: int
    allowed_types: frozenset[str]
    upload_url_ttl_seconds: int
    download_url_ttl_seconds: int
    # Upload and CompleteUpload calls, which buffer a whole file, in progress at once.
    max_concurrent_uploads_per_user: int = DEFAULT_MAX_PER_USER
    max_concurrent_uploads: int = DEFAULT_MAX_PER_PROCESS

    @classmethod
    def from_settings(cls, settings: Settings) -> FileLimits:
        return cls(
            max_bytes=settings.files_max_bytes,
            quota_bytes=settings.files_quota_bytes,
            quota_count=settings.files_quota_count,
            allowed_types=frozenset(normalize_content_type(value) for value in settings.files_allowed_types),
            upload_url_ttl_seconds=settings.files_upload_url_ttl_seconds,
            download_url_ttl_seconds=settings.files_download_url_ttl_seconds,
            max_concurrent_uploads_per_user=settings.files_max_concurrent_uploads_per_user,
            max_concurrent_uploads=settings.files_max_concurrent_uploads,
        )


@dataclass(frozen=True, slots=True)
class UploadTarget:
    """The signed URL, headers and expiry time for the PUT of a reserved file's bytes."""

    url: str
    headers: dict[str, str]
    expire_time: datetime


@dataclass(frozen=True, slots=True)
class DownloadTarget:
    """A signed URL serving one object of a file, and what it serves."""

    url: str
    expire_time: datetime
    content_type: str


@dataclass(frozen=True, slots=True)
class FilePage:
    """One page of ListFiles: the files and the token of the next page, empty on the last."""

    files: list[File]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class UploadMetadata:
    """The file declaration in the first message of an Upload stream."""

    name: str
    content_type: str
    size: int | None
    sha256: str


class Files:
    """The files use cases over one database and one object storage."""

    def __init__(self, database: Database, storage: ObjectStorage, limits: FileLimits) -> None:
        self.database = database
        self.storage = storage
        self.limits = limits
        # NOTE: each Upload and CompleteUpload call still buffers the whole file in memory, so
        # these slots bound that memory at about FILES_MAX_BYTES × max_concurrent_uploads per process.
        self.upload_slots = UploadSlots(
            max_per_user=limits.max_concurrent_uploads_per_user, max_per_process=limits.max_concurrent_uploads
        )

    async def create_upload(
        self, principal: Principal, name: str, content_type: str, size: int, sha256: str, *, now: datetime | None = None
    ) -> tuple[File, UploadTarget]:
        """Reserve a file of `size` bytes for the caller and return it with its signed upload URL."""
        now = now or datetime.now(UTC)
        name, content_type, sha256 = self._check_declaration(name, content_type, sha256, size)
        self._check_max_size(size)

        file = self._new_file(principal.uid, name, content_type, size, sha256, now)
        async with self.database.unit_of_work() as session:
            await self._check_quota(session, principal.uid, size)
            await store.add_file(session, file)

        try:
            url = await self.storage.signed_upload_url(
                file.keys.original,
                expires_in_seconds=self.limits.upload_url_ttl_seconds,
                content_type=content_type,
                max_bytes=size,
            )
        except StorageError as error:
            # Without a URL the reservation is useless, and it would hold quota until it expires.
            await self._remove_reservation(file)
            raise _storage_failure(error, "creating an upload URL", file.id) from None

        log.info("upload reserved", extra={"uid": principal.uid, "file_id": file.id, "size": size})
        return file, UploadTarget(url=url, headers={"content-type": content_type}, expire_time=file.upload_expire_time)

    async def complete_upload(self, principal: Principal, file_id: str, *, now: datetime | None = None) -> File:
        """Check the uploaded bytes of a pending file and accept them; return the accepted file."""
        now = now or datetime.now(UTC)
        async with self.database.unit_of_work() as session:
            file = await _visible_file(session, principal, file_id)
        if file.status is FileStatus.FAILED:
            raise FailedPrecondition(f"file {file.id} failed: {file.failure_reason}", reason="FILE_FAILED")
        if file.status is not FileStatus.PENDING:
            return file
        if now >= file.upload_expire_time:
            raise FailedPrecondition(
                f"the upload of file {file.id} expired at {file.upload_expire_time.isoformat()}: create a new upload",
                reason="UPLOAD_EXPIRED",
            )

        # One completion per file at a time: a second concurrent one fails with Aborted instead
        # of reading the same bytes into memory again.
        with self.upload_slots.hold(principal.uid, completing=file.id):
            data = await self._read_upload(file)
            try:
                digest = await asyncio.to_thread(self._check_content, file.content_type, file.size, file.sha256, data)
            except ServiceError:
                # The bytes are deleted, so that the next CompleteUpload reads a new PUT and not these.
                await self._delete_objects([file.keys.original], file.id)
                raise
            await self._store_with_declared_type(file, data)

            return await self._accept(file, digest, now)

    async def upload(
        self, principal: Principal, metadata: UploadMetadata, chunks: AsyncIterator[bytes], *, now: datetime | None = None
    ) -> File:
        """Store a file sent as a stream of chunks and accept it, with the checks of CreateUpload and CompleteUpload.

        Reading stops with ResourceExhausted as soon as the bytes exceed the maximum file size or
        the caller's quota, and with InvalidInput as soon as they exceed the declared size. A
        stream that ends short of the declared size fails with InvalidInput too, and one that
        stalls between chunks fails with DeadlineExceeded (see chunks_in_time).
        """
        now = now or datetime.now(UTC)
        name, content_type, sha256 = self._check_declaration(
            metadata.name, metadata.content_type, metadata.sha256, metadata.size
        )
        if metadata.size is not None:
            self._check_max_size(metadata.size)

        # The slot is taken when the first bytes arrive (or the stream ends), so that streams
        # which send their metadata and then wait hold no slot that CompleteUpload needs.
        timed_chunks = chunks_in_time(chunks, self.limits.max_bytes)
        first = await anext(timed_chunks, None)
        with self.upload_slots.hold(principal.uid):
            rest = _chunks_after(first, timed_chunks)
            return await self._store_stream(principal, name, content_type, sha256, metadata.size, rest, now)

    async def _store_stream(
        self,
        principal: Principal,
        name: str,
        content_type: str,
        sha256: str,
        declared_size: int | None,
        chunks: AsyncIterator[bytes],
        now: datetime,
    ) -> File:
        async with self.database.unit_of_work() as session:
            usage = await store.get_usage(session, principal.uid)
        self._check_usage(usage, declared_size if declared_size is not None else 1)

        data = await self._read_chunks(chunks, declared_size, usage)
        if declared_size is None and not data:
            raise InvalidInput(FieldViolation("chunk", "must carry at least 1 byte in total: got an empty stream"))
        if declared_size is not None and len(data) != declared_size:
            raise InvalidInput(
                FieldViolation("size", f"must equal the number of uploaded bytes: declared {declared_size}, received {len(data)}")
            )
        size = len(data)
        digest = await asyncio.to_thread(self._check_content, content_type, size, sha256, data)

        file = self._new_file(principal.uid, name, content_type, size, sha256, now)
        async with self.database.unit_of_work() as session:
            await self._check_quota(session, principal.uid, size)
            await store.add_file(session, file)
        try:
            await self.storage.put(file.keys.original, data, content_type=content_type)
        except StorageError as error:
            await self._remove_reservation(file)
            raise _storage_failure(error, "storing an upload", file.id) from None

        # A crash from here on leaves a pending file, which the sweeper removes once it expires.
        return await self._accept(file, digest, now)

    async def get_file(self, principal: Principal, file_id: str) -> File:
        """Return a file of the caller, or any file for an admin."""
        async with self.database.unit_of_work() as session:
            return await _visible_file(session, principal, file_id)

    async def list_files(
        self, principal: Principal, page_size: int, page_token: str, content_type: str, status: FileStatus | None
    ) -> FilePage:
        """List the caller's files, newest first, optionally of one content type or status.

        `page_size` 0 means 50 and values above 100 are capped at 100. `page_token` must come from
        a request with the same filters.
        """
        if page_size < 0:
            raise InvalidInput(FieldViolation("page_size", f"must not be negative: got {page_size}"))
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if content_type:
            content_type = _normalized_content_type(content_type)
        filters = [content_type, status.value if status is not None else ""]
        before_id = decode_page_token(page_token, filters) if page_token else None

        # Fetching one extra row shows whether another page follows.
        async with self.database.unit_of_work() as session:
            files = await store.list_files(
                session, principal.uid, limit=limit + 1, before_id=before_id, content_type=content_type, status=status
            )
        if len(files) <= limit:
            return FilePage(files=files, next_page_token="")
        page = files[:limit]
        return FilePage(files=page, next_page_token=encode_page_token(page[-1].id, filters))

    async def get_download_url(
        self, principal: Principal, file_id: str, *, thumbnail: bool, inline: bool, now: datetime | None = None
    ) -> DownloadTarget:
        """Return a signed URL that serves a ready file, its metadata-free copy for images, or its thumbnail."""
        now = now or datetime.now(UTC)
        async with self.database.unit_of_work() as session:
            file = await _visible_file(session, principal, file_id)
        if file.status is not FileStatus.READY:
            raise FailedPrecondition(
                f"file {file.id} is {file.status.value}, not ready: download it once GetFile reports READY",
                reason="FILE_NOT_READY",
            )
        if thumbnail and not file.has_thumbnail:
            raise FailedPrecondition(f"file {file.id} has no thumbnail: only images get one", reason="NO_THUMBNAIL")

        file_name = file.name
        if thumbnail:
            key, content_type = file.keys.thumbnail, file.thumbnail_content_type
            file_name = thumbnail_name(file.name, content_type)
        elif file.is_processed_image:
            # Images are served from the copy without EXIF, so no location or camera data leaks.
            key, content_type = file.keys.stripped, file.content_type
        else:
            key, content_type = file.keys.original, file.content_type
        ttl = self.limits.download_url_ttl_seconds
        try:
            url = await self.storage.signed_download_url(key, expires_in_seconds=ttl, file_name=file_name, inline=inline)
        except StorageError as error:
            raise _storage_failure(error, "creating a download URL", file.id) from None
        return DownloadTarget(url=url, expire_time=now + timedelta(seconds=ttl), content_type=content_type)

    async def rename_file(
        self, principal: Principal, file_id: str, name: str, etag: str, *, now: datetime | None = None
    ) -> File:
        """Give a file a new name; with `etag`, only if the file has not changed since that version."""
        now = now or datetime.now(UTC)
        name = _checked_name(name)

        async with self.database.unit_of_work() as session:
            file = await _visible_file(session, principal, file_id, for_update=True)
            if not etag:
                return await store.update_file(session, file, name=name, update_time=now)
            if etag != file.etag:
                raise Aborted(f"file {file.id} was modified since etag {shown(etag)}; read it again and retry")
            # SQLite takes no row lock on the read above, so the version is checked again by the UPDATE.
            renamed = await store.update_file_version(session, file, name=name, update_time=now)
            if renamed is None:
                raise Aborted(f"file {file.id} was modified since etag {shown(etag)}; read it again and retry")
            return renamed

    async def delete_file(self, principal: Principal, file_id: str) -> None:
        """Delete a file in any status, and its stored objects."""
        async with self.database.unit_of_work() as session:
            file = await _visible_file(session, principal, file_id, for_update=True)
            await store.remove_file(session, file.id)
            await revoke_upload_urls(session, [file], datetime.now(UTC))
            await record_event(session, events_pb2.FileDeleted(file_id=file.id, uid=file.uid))

        await self._delete_objects(file.keys.all, file.id)
        log.info("file deleted", extra={"uid": file.uid, "file_id": file.id})

    async def accepts_upload(self, key: str, *, now: datetime | None = None) -> bool:
        """Return whether a PUT to a signed upload URL of `key` may store its bytes.

        True only while a pending file owns `key` as its upload key and its upload has not
        expired. The local adapter calls it before and after it takes a PUT. A malformed key
        returns False, and a database failure raises ServiceError.
        """
        now = now or datetime.now(UTC)
        segment, _, file_id = key.partition("/")
        if not segment or not _FILE_ID_PATTERN.fullmatch(file_id):
            return False

        async with self.database.unit_of_work() as session:
            file = await store.find_file(session, file_id)
        if file is None or file.status is not FileStatus.PENDING:
            return False
        return file.keys.original == key and now < file.upload_expire_time

    async def sweep_abandoned_uploads(self, *, now: datetime | None = None) -> int:
        """Remove the pending files whose upload URL expired, and their objects; return how many.

        Also deletes the objects of revoked upload keys whose delete time has come, and partial
        objects that interrupted uploads left behind.
        """
        now = now or datetime.now(UTC)
        removed: list[File] = []
        while True:
            batch: list[File] = []
            async with self.database.unit_of_work() as session:
                for file in await store.list_expired_uploads(session, now, limit=SWEEP_BATCH_SIZE):
                    # Only a file still pending goes: a CompleteUpload may have accepted it since the list.
                    if await store.remove_file(session, file.id, status=FileStatus.PENDING):
                        await revoke_upload_urls(session, [file], now)
                        await record_event(session, events_pb2.FileDeleted(file_id=file.id, uid=file.uid))
                        batch.append(file)
            for file in batch:
                await self._delete_objects(file.keys.all, file.id)
            removed.extend(batch)
            if len(batch) < SWEEP_BATCH_SIZE:
                break

        if removed:
            log.info("removed abandoned uploads", extra={"count": len(removed)})
        await self._delete_revoked_uploads(now)
        try:
            await self.storage.remove_stale_temporaries(STALE_TEMPORARY_SECONDS)
        except StorageError as error:
            log.warning("could not remove stale temporary objects yet: %s", type(error).__name__)
        return len(removed)

    async def _delete_revoked_uploads(self, now: datetime) -> int:
        """Delete the objects of revoked upload keys that are due, then their rows; return how many."""
        deleted = 0
        while True:
            async with self.database.unit_of_work() as session:
                keys = await store.list_due_revoked_uploads(session, now, limit=SWEEP_BATCH_SIZE)
            if not keys:
                break
            try:
                await self.storage.delete(keys)
            except StorageError as error:
                # The rows stay, so the next sweep tries these keys again.
                log.warning("could not delete the objects of revoked uploads yet: %s", type(error).__name__)
                break
            async with self.database.unit_of_work() as session:
                await store.remove_revoked_uploads(session, keys, now)
            deleted += len(keys)
            if len(keys) < SWEEP_BATCH_SIZE:
                break

        if deleted:
            log.info("deleted the objects of revoked uploads", extra={"count": deleted})
        return deleted

    def _check_declaration(self, name: str, content_type: str, sha256: str, size: int | None) -> tuple[str, str, str]:
        """Return the name, normalized content type and lower-case sha256, or raise InvalidInput naming every bad field."""
        violations = []
        if (problem := check_name(name)) is not None:
            violations.append(FieldViolation("name", problem))
        normalized = ""
        try:
            normalized = normalize_content_type(content_type)
        except ValueError:
            violations.append(FieldViolation("content_type", f"must be type/subtype, such as image/png: got {shown(content_type)}"))
        else:
            if normalized not in self.limits.allowed_types:
                violations.append(
                    FieldViolation("content_type", f"must be one of {sorted(self.limits.allowed_types)}: got {shown(content_type)}")
                )
        if size is not None and size <= 0:
            violations.append(FieldViolation("size", f"must be at least 1 byte: got {size}"))
        if sha256 and not _SHA256_PATTERN.fullmatch(sha256):
            violations.append(FieldViolation("sha256", f"must be 64 hexadecimal characters: got {shown(sha256)}"))
        if violations:
            raise InvalidInput(violations)
        return name, normalized, sha256.lower()

    def _check_max_size(self, size: int) -> None:
        if size > self.limits.max_bytes:
            raise ResourceExhausted(
                f"file size exceeds the maximum of {self.limits.max_bytes} bytes per file: got {size} bytes",
                reason="FILE_TOO_LARGE",
            )

    async def _check_quota(self, session: AsyncSession, uid: str, size: int) -> None:
        await store.lock_user(session, uid)
        self._check_usage(await store.get_usage(session, uid), size)

    def _check_usage(self, usage: store.Usage, size: int) -> None:
        if usage.count + 1 > self.limits.quota_count:
            raise ResourceExhausted(
                f"file count quota exceeded: {usage.count} of {self.limits.quota_count} files used, 1 more requested",
                reason="QUOTA_COUNT_EXCEEDED",
            )
        if usage.bytes + size > self.limits.quota_bytes:
            raise ResourceExhausted(
                f"storage quota exceeded: {usage.bytes} of {self.limits.quota_bytes} bytes used, {size} more requested",
                reason="QUOTA_BYTES_EXCEEDED",
            )

    def _check_content(self, content_type: str, size: int, sha256: str, data: bytes) -> str:
        """Return the SHA-256 of `data`, or raise InvalidInput when the bytes disagree with the declaration."""
        if len(data) != size:
            raise InvalidInput(
                FieldViolation("size", f"must equal the number of uploaded bytes: declared {size}, uploaded {len(data)}")
            )
        digest = hashlib.sha256(data).hexdigest()
        if sha256 and sha256 != digest:
            raise InvalidInput(
                FieldViolation("sha256", f"must equal the SHA-256 of the uploaded bytes: declared {sha256}, computed {digest}")
            )
        sniffed = sniff_content_type(data)
        if sniffed != content_type:
            found = sniffed or "of no recognized type"
            raise InvalidInput(
                FieldViolation("content_type", f"must match the uploaded bytes: declared {content_type}, but the bytes are {found}"),
                reason="CONTENT_TYPE_MISMATCH",
            )
        return digest

    async def _read_upload(self, file: File) -> bytes:
        """Return the bytes PUT to a pending file's upload URL, refusing more than the maximum file size."""
        try:
            info = await self.storage.info(file.keys.original)
            if info.size > self.limits.max_bytes:
                await self._delete_objects([file.keys.original], file.id)
                self._check_max_size(info.size)
            if info.size != file.size:
                await self._delete_objects([file.keys.original], file.id)
                raise InvalidInput(
                    FieldViolation("size", f"must equal the number of uploaded bytes: declared {file.size}, uploaded {info.size}")
                )
            return await self.storage.get(file.keys.original)
        except ObjectNotFound:
            raise FailedPrecondition(
                f"file {file.id} has no uploaded bytes: upload the bytes first with a PUT to the upload URL",
                reason="UPLOAD_MISSING",
            ) from None
        except StorageError as error:
            raise _storage_failure(error, "reading an upload", file.id) from None

    async def _read_chunks(self, chunks: AsyncIterator[bytes], declared_size: int | None, usage: store.Usage) -> bytes:
        """Collect the chunks of an Upload stream, stopping at the first byte past a limit."""
        buffer = bytearray()
        async for chunk in chunks:
            buffer += chunk
            received = len(buffer)
            if received > self.limits.max_bytes:
                self._check_max_size(received)
            if declared_size is not None and received > declared_size:
                raise InvalidInput(
                    FieldViolation("size", f"must equal the number of uploaded bytes: declared {declared_size}, received at least {received}")
                )
            self._check_usage(usage, received)
        return bytes(buffer)

    async def _store_with_declared_type(self, file: File, data: bytes) -> None:
        """Store the bytes again when the PUT labeled them with another content type than the checked one.

        The stored content type is what download URLs serve, so a text file PUT as text/html
        must not keep that type.
        """
        try:
            info = await self.storage.info(file.keys.original)
            if not _is_content_type(info.content_type, file.content_type):
                await self.storage.put(file.keys.original, data, content_type=file.content_type)
        except StorageError as error:
            raise _storage_failure(error, "storing an upload", file.id) from None

    async def _accept(self, file: File, digest: str, now: datetime) -> File:
        """Mark a pending file READY, or PROCESSING for an image, and record FileUploaded."""
        status = FileStatus.PROCESSING if file.is_processed_image else FileStatus.READY
        async with self.database.unit_of_work() as session:
            await store.lock_user(session, file.uid)
            current = await store.get_file(session, file.id, for_update=True)
            if current.status is not FileStatus.PENDING:
                return current
            self._check_usage(await store.get_usage(session, current.uid, excluding=current.id), current.size)
            accepted = await store.update_file(session, current, status=status.value, sha256=digest, update_time=now)
            await record_event(session, events_pb2.FileUploaded(file_id=file.id, uid=file.uid))
        log.info("upload accepted", extra={"uid": file.uid, "file_id": file.id, "status": status.value})
        return accepted

    async def _remove_reservation(self, file: File) -> None:
        try:
            async with self.database.unit_of_work() as session:
                await store.remove_file(session, file.id)
        except ServiceError:
            log.warning("could not remove a failed reservation; it is swept once it expires", extra={"file_id": file.id})

    async def _delete_objects(self, keys: Iterable[str], file_id: str) -> None:
        await delete_objects_now(self.storage, keys, file_id)

    def _new_file(self, uid: str, name: str, content_type: str, size: int, sha256: str, now: datetime) -> File:
        return File(
            id=new_file_id(now),
            uid=uid,
            name=name,
            content_type=content_type,
            size=size,
            sha256=sha256,
            status=FileStatus.PENDING,
            create_time=now,
            update_time=now,
            upload_expire_time=now + timedelta(seconds=self.limits.upload_url_ttl_seconds),
        )


async def process_uploaded_file(session: AsyncSession, storage: ObjectStorage, file_id: str) -> None:
    """Store an uploaded image's copy without metadata and its thumbnail, then mark it ready.

    Runs in the FileUploaded consumer's transaction. An image Pillow cannot read marks the file
    FAILED with the reason, and its objects are removed. A storage failure raises, so that the
    relay retries the event.

    NOTE: on SQLite that transaction holds the database's write lock from the relay's first
    insert on, so other writers wait while the image is read, processed and stored.
    """
    file = await store.find_file(session, file_id, for_update=True)
    if file is None or file.status is not FileStatus.PROCESSING:
        # Deleted since, or processed by an earlier delivery of the event.
        return

    try:
        data = await storage.get(file.keys.original)
    except ObjectNotFound:
        await _fail(session, storage, file, "the uploaded bytes are missing from storage")
        return
    try:
        stripped = await asyncio.to_thread(images.strip_metadata, data, file.content_type)
        thumbnail, thumbnail_type = await asyncio.to_thread(images.make_thumbnail, data)
    except images.ImageError as error:
        await _fail(session, storage, file, f"the image could not be processed: {error}")
        return

    # NOTE: a storage outage that outlasts the relay's retries leaves the file PROCESSING, with
    # a dead letter whose replay finishes the job.
    await storage.put(file.keys.stripped, stripped, content_type=file.content_type)
    await storage.put(file.keys.thumbnail, thumbnail, content_type=thumbnail_type)
    # The copies are charged to the quota, because re-encoding can make them larger than the
    # upload (a JPEG saved at quality 1 grows about 3 times). They may take the owner past the
    # quota, and then the next upload fails.
    await store.update_file(
        session,
        file,
        status=FileStatus.READY.value,
        thumbnail_content_type=thumbnail_type,
        processed_bytes=len(stripped) + len(thumbnail),
        update_time=datetime.now(UTC),
    )
    log.info("image processed", extra={"uid": file.uid, "file_id": file.id})


async def remove_deleted_file_objects(storage: ObjectStorage, file_id: str, uid: str) -> None:
    """Delete the objects of a deleted file; raise StorageError so that the relay retries."""
    await storage.delete(FileKeys.of(uid, file_id).all)


async def remove_user_files(session: AsyncSession, storage: ObjectStorage, uid: str) -> int:
    """Delete every object and row of a user; return how many rows there were.

    Runs in the UserDeleted consumer's transaction. A storage failure raises, so that the relay
    retries the event. Upload keys whose URLs may still take a PUT are revoked, so the sweeper
    deletes what arrives there later.
    """
    keys = await storage.list_keys(uid_key_segment(uid))
    if keys:
        await storage.delete(keys)
    await revoke_upload_urls(session, await store.list_user_files(session, uid), datetime.now(UTC))
    removed = await store.remove_user_files(session, uid)
    log.info("removed the files of a deleted user", extra={"uid": uid, "count": removed, "objects": len(keys)})
    return removed


async def revoke_upload_urls(session: AsyncSession, files: Iterable[File], now: datetime) -> None:
    """Record the upload keys of removed files whose signed URLs may still take a PUT after `now`."""
    by_delete_time: dict[tuple[str, datetime], list[str]] = {}
    for file in files:
        delete_time = upload_url_end_time(file)
        if delete_time > now:
            by_delete_time.setdefault((file.uid, delete_time), []).append(file.keys.original)
    for (uid, delete_time), keys in by_delete_time.items():
        await store.add_revoked_uploads(session, uid, keys, delete_time)


async def _chunks_after(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield `first`, unless it is None, then the chunks of `rest`."""
    if first is None:
        return
    yield first
    async for chunk in rest:
        yield chunk


def upload_url_end_time(file: File) -> datetime:
    """Return when no signed upload URL of the file can still be writing an object."""
    ttl_end = file.upload_expire_time
    supabase_end = file.create_time + timedelta(seconds=SUPABASE_UPLOAD_URL_LIFETIME_SECONDS)
    return max(ttl_end, supabase_end) + timedelta(seconds=UPLOAD_PUT_MARGIN_SECONDS)


def thumbnail_name(name: str, content_type: str) -> str:
    """Return the name a thumbnail downloads under: `<stem>.thumbnail.<extension of its type>`."""
    stem, dot, _ = name.rpartition(".")
    if not dot or not stem:
        # No extension, or a name such as ".profile" that is all extension.
        stem = name
    return f"{stem}.thumbnail.{_THUMBNAIL_EXTENSIONS.get(content_type, 'bin')}"


async def delete_objects_now(storage: ObjectStorage, keys: Iterable[str], file_id: str) -> None:
    """Delete objects when storage allows; a failure is logged, and FileDeleted or the sweeper retries."""
    try:
        await storage.delete(list(keys))
    except StorageError as error:
        log.warning("could not delete a file's objects yet: %s", type(error).__name__, extra={"file_id": file_id})


async def _fail(session: AsyncSession, storage: ObjectStorage, file: File, reason: str) -> None:
    # The bytes go, because a failed file is not charged to the quota.
    await delete_objects_now(storage, file.keys.all, file.id)
    await store.update_file(
        session, file, status=FileStatus.FAILED.value, failure_reason=reason[:FAILURE_REASON_MAX_LENGTH],
        update_time=datetime.now(UTC),
    )
    log.warning("file processing failed", extra={"uid": file.uid, "file_id": file.id, "reason": reason})


def new_file_id(now: datetime) -> str:
    """Return a new file id: 12 hex digits of Unix milliseconds, then 20 random ones.

    Ids sort by creation time, so listing newest first orders by id alone.
    """
    return f"{int(now.timestamp() * 1000):012x}{secrets.token_hex(10)}"


def check_name(name: str) -> str | None:
    """Return what is wrong with a file name, or None when it is valid.

    A name is metadata only, never part of a storage key, so any character is allowed except
    control characters and line or paragraph separators, which would break log lines and
    Content-Disposition headers.
    """
    if not name.strip():
        return f"must be 1 to {NAME_MAX_LENGTH} characters and not only blanks: got {len(name)} characters"
    if len(name) > NAME_MAX_LENGTH:
        return f"must be at most {NAME_MAX_LENGTH} characters: got {len(name)}"
    for index, character in enumerate(name):
        # Cc covers NUL, the other C0 controls, DEL and C1.
        if unicodedata.category(character) in ("Cc", "Zl", "Zp"):
            return f"must not contain control characters: got U+{ord(character):04X} at index {index}"
    return None


def _checked_name(name: str) -> str:
    if (problem := check_name(name)) is not None:
        raise InvalidInput(FieldViolation("name", problem))
    return name


def _is_content_type(value: str, expected: str) -> bool:
    try:
        return normalize_content_type(value) == expected
    except ValueError:
        return False


def _normalized_content_type(content_type: str) -> str:
    try:
        return normalize_content_type(content_type)
    except ValueError:
        raise InvalidInput(
            FieldViolation("content_type", f"must be type/subtype, such as image/png: got {shown(content_type)}")
        ) from None


async def _visible_file(session: AsyncSession, principal: Principal, file_id: str, *, for_update: bool = False) -> File:
    """Return the file if the caller owns it or is an admin; otherwise raise NotFound.

    Another user's file gets the same NotFound as a missing one, so a caller learns nothing
    about files, or owners, that are not theirs.
    """
    if not _FILE_ID_PATTERN.fullmatch(file_id):
        raise InvalidInput(
            FieldViolation("file_id", f"must be {FILE_ID_LENGTH} lower-case hexadecimal characters: got {shown(file_id)}")
        )
    file = await store.find_file(session, file_id, for_update=for_update)
    if file is None or (file.uid != principal.uid and not principal.is_admin):
        raise NotFound(f"file {file_id} not found")
    return file


def encode_page_token(before_id: str, filters: list[str]) -> str:
    """Build the opaque token of the page after the file `before_id`."""
    return pagination.encode_page_token(before_id, filters)


def decode_page_token(page_token: str, filters: list[str]) -> str:
    """Decode a page token into the id its page starts before.

    Raise InvalidInput when ListFiles did not issue the token or issued it for other filters.
    """
    before_id = pagination.decode_page_token(page_token, filters, method="ListFiles", filter_names="content_type and status filters")
    if not isinstance(before_id, str) or not _FILE_ID_PATTERN.fullmatch(before_id):
        raise InvalidInput(FieldViolation("page_token", f"must be a next_page_token returned by ListFiles: got {shown(page_token)}"))
    return before_id


def _storage_failure(error: StorageError, action: str, file_id: str) -> ServiceError:
    """Translate a storage failure into the error returned to the caller. The adapter's message goes only to the log."""
    log.warning("file storage failed while %s: %s", action, error, extra={"file_id": file_id, "error_type": type(error).__name__})
    if isinstance(error, ObjectRejected):
        return InvalidInput(FieldViolation("file", "was rejected by the file storage for its type or size"))
    if isinstance(error, ObjectNotFound):
        return FailedPrecondition(f"the stored bytes of file {file_id} are missing", reason="OBJECT_MISSING")
    return Unavailable(STORAGE_UNAVAILABLE_MESSAGE, reason="STORAGE_UNAVAILABLE")