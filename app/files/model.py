"""The files table, the File domain type and the storage keys of a file's objects."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.platform.db import Base, UtcDateTime

FILE_ID_LENGTH = 32
UID_MAX_LENGTH = 128
NAME_MAX_LENGTH = 255
CONTENT_TYPE_MAX_LENGTH = 255
SHA256_LENGTH = 64
FAILURE_REASON_MAX_LENGTH = 500
# "x." and a SHA-256 (66 characters) or a plain uid (at most 128), "/" and a file id.
STORAGE_KEY_MAX_LENGTH = 200
# A uid made of these characters is its own key segment. Dots are left out, so that no raw uid
# can look like the hashed segment of another uid, which starts with "x.".
_PLAIN_UID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class FileStatus(enum.StrEnum):
    """The stage of a file's life, as stored in `files.status`."""

    PENDING = "pending"
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


# Image types that get a thumbnail and a copy without metadata; the types Pillow processes here.
PROCESSED_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# Statuses whose size and count are charged to the owner's quota. A failed file has no bytes left.
QUOTA_STATUSES = (FileStatus.PENDING, FileStatus.PROCESSING, FileStatus.READY)


class FileRow(Base):
    """One row of `files`: one file of one user, from its reservation on."""

    __tablename__ = "files"
    __table_args__ = (
        # Listing reads one user's rows in id order, and quotas sum them.
        Index("ix_files_uid_id", "uid", "id"),
        # The sweeper looks for pending uploads past their expiry.
        Index("ix_files_status_upload_expire_time", "status", "upload_expire_time"),
    )

    id: Mapped[str] = mapped_column(String(FILE_ID_LENGTH), primary_key=True)
    uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    content_type: Mapped[str] = mapped_column(String(CONTENT_TYPE_MAX_LENGTH))
    size: Mapped[int] = mapped_column(BigInteger)
    # Empty while pending unless the uploader declared it.
    sha256: Mapped[str] = mapped_column(String(SHA256_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str] = mapped_column(String(FAILURE_REASON_MAX_LENGTH))
    # Empty when the file has no thumbnail.
    thumbnail_content_type: Mapped[str] = mapped_column(String(CONTENT_TYPE_MAX_LENGTH))
    # Incremented by every update; the etag is derived from it.
    version: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime)
    upload_expire_time: Mapped[datetime] = mapped_column(UtcDateTime)
    # Bytes of the copies the server made (an image's copy without metadata and its thumbnail).
    # The quota charges them on top of `size`, because re-encoding can make them larger.
    processed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class RevokedUploadRow(Base):
    """An upload key whose file is gone while a signed URL to it may still take a PUT.

    The sweeper deletes the object under `key` once `delete_time` has passed, so bytes PUT
    after the file was deleted are removed too. Each row lives only as long as the longest
    lifetime of a signed upload URL.
    """

    __tablename__ = "revoked_uploads"
    __table_args__ = (Index("ix_revoked_uploads_delete_time", "delete_time"),)

    key: Mapped[str] = mapped_column(String(STORAGE_KEY_MAX_LENGTH), primary_key=True)
    uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH))
    delete_time: Mapped[datetime] = mapped_column(UtcDateTime)


@dataclass(frozen=True, slots=True)
class File:
    """A file, independent of the table and of the proto messages."""

    id: str
    uid: str
    name: str
    content_type: str
    size: int
    sha256: str
    status: FileStatus
    create_time: datetime
    update_time: datetime
    upload_expire_time: datetime
    failure_reason: str = ""
    thumbnail_content_type: str = ""
    version: int = 1
    processed_bytes: int = 0

    @property
    def etag(self) -> str:
        """The version tag a client sends back to rename only the version it read."""
        return str(self.version)

    @property
    def is_processed_image(self) -> bool:
        """Whether the file gets a thumbnail and is served from a copy without metadata."""
        return self.content_type in PROCESSED_IMAGE_TYPES

    @property
    def has_thumbnail(self) -> bool:
        return self.status is FileStatus.READY and bool(self.thumbnail_content_type)

    @property
    def keys(self) -> FileKeys:
        return FileKeys.of(self.uid, self.id)


@dataclass(frozen=True, slots=True)
class FileKeys:
    """The storage keys of one file's objects.

    The uploaded bytes live at `<uid>/<file id>`, and the objects derived from them below it.
    Every key starts with `<uid>/`, so listing that prefix finds every object of a user.
    """

    original: str
    stripped: str
    thumbnail: str

    @classmethod
    def of(cls, uid: str, file_id: str) -> FileKeys:
        original = f"{uid_key_segment(uid)}/{file_id}"
        return cls(original=original, stripped=f"{original}/stripped", thumbnail=f"{original}/thumbnail")

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.original, self.stripped, self.thumbnail)


def uid_key_segment(uid: str) -> str:
    """Return the first segment of a user's storage keys.

    Storage keys allow only [A-Za-z0-9._-], and Firebase uids may hold other characters, so
    such a uid is replaced by "x." and its SHA-256. Every other uid is used as it is.
    """
    if _PLAIN_UID.fullmatch(uid):
        return uid
    return "x." + hashlib.sha256(uid.encode()).hexdigest()


def file_from_row(row: FileRow) -> File:
    """Build the domain file of a table row."""
    return File(
        id=row.id,
        uid=row.uid,
        name=row.name,
        content_type=row.content_type,
        size=row.size,
        sha256=row.sha256,
        status=FileStatus(row.status),
        create_time=row.create_time,
        update_time=row.update_time,
        upload_expire_time=row.upload_expire_time,
        failure_reason=row.failure_reason,
        thumbnail_content_type=row.thumbnail_content_type,
        version=row.version,
        processed_bytes=row.processed_bytes,
    )
