"""Queries on the files table. Functions take the caller's session and never commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.files.model import (
    QUOTA_STATUSES,
    File,
    FileRow,
    FileStatus,
    RevokedUploadRow,
    file_from_row,
)
from app.platform.db import lock_for_writing
from app.platform.errors import NotFound


@dataclass(frozen=True, slots=True)
class Usage:
    """The quota usage of one user: the number of charged files and their total size in bytes."""

    count: int
    bytes: int


async def lock_user(session: AsyncSession, uid: str) -> None:
    """Serialize quota checks of one user until the transaction ends; call it first in the transaction.

    Two concurrent reservations then cannot both pass a quota that only one of them fits.
    """
    await lock_for_writing(session, f"files:{uid}", FileRow)


async def get_usage(session: AsyncSession, uid: str, *, excluding: str | None = None) -> Usage:
    """Count the files of `uid` that the quota charges, and sum their sizes and processed copies, leaving out the file `excluding`."""
    charged_bytes = FileRow.size + FileRow.processed_bytes
    statement = select(func.count(), func.coalesce(func.sum(charged_bytes), 0)).where(
        FileRow.uid == uid, FileRow.status.in_([status.value for status in QUOTA_STATUSES])
    )
    if excluding is not None:
        statement = statement.where(FileRow.id != excluding)
    count, total = (await session.execute(statement)).one()
    return Usage(count=count, bytes=int(total))


async def add_file(session: AsyncSession, file: File) -> None:
    """Insert a new file."""
    await session.execute(
        insert(FileRow).values(
            id=file.id,
            uid=file.uid,
            name=file.name,
            content_type=file.content_type,
            size=file.size,
            sha256=file.sha256,
            status=file.status.value,
            failure_reason=file.failure_reason,
            thumbnail_content_type=file.thumbnail_content_type,
            version=file.version,
            create_time=file.create_time,
            update_time=file.update_time,
            upload_expire_time=file.upload_expire_time,
        )
    )


async def find_file(session: AsyncSession, file_id: str, *, for_update: bool = False) -> File | None:
    """Return the file with this id, or None.

    With `for_update`, Postgres locks the row until the transaction ends.
    """
    statement = select(FileRow).where(FileRow.id == file_id)
    if for_update:
        statement = statement.with_for_update()
    row = (await session.execute(statement)).scalar_one_or_none()
    return file_from_row(row) if row is not None else None


async def get_file(session: AsyncSession, file_id: str, *, for_update: bool = False) -> File:
    """Return the file with this id, or raise NotFound."""
    file = await find_file(session, file_id, for_update=for_update)
    if file is None:
        raise NotFound(f"file {file_id} not found")
    return file


async def list_files(
    session: AsyncSession,
    uid: str,
    *,
    limit: int,
    before_id: str | None = None,
    content_type: str = "",
    status: FileStatus | None = None,
) -> list[File]:
    """List at most `limit` files of `uid`, newest first, with ids below `before_id` when given."""
    statement = select(FileRow).where(FileRow.uid == uid)
    if before_id is not None:
        statement = statement.where(FileRow.id < before_id)
    if content_type:
        statement = statement.where(FileRow.content_type == content_type)
    if status is not None:
        statement = statement.where(FileRow.status == status.value)
    statement = statement.order_by(FileRow.id.desc()).limit(limit)
    return [file_from_row(row) for row in (await session.execute(statement)).scalars()]


async def update_file(session: AsyncSession, file: File, **values: object) -> File:
    """Write `values` to the file's row, bump its version and return the updated file.

    Raise NotFound when the row is gone.
    """
    updated = await _update_row(session, file.id, None, values)
    if updated is None:
        raise NotFound(f"file {file.id} not found")
    return updated


async def update_file_version(session: AsyncSession, file: File, **values: object) -> File | None:
    """Write `values` only while the row still has `file.version`; return the updated file, or None.

    None means that another update changed the row since `file` was read, or deleted it. The
    version check is part of the UPDATE itself, so two concurrent calls with the same version
    cannot both succeed, on SQLite as on Postgres.
    """
    return await _update_row(session, file.id, file.version, values)


async def _update_row(session: AsyncSession, file_id: str, version: int | None, values: dict[str, object]) -> File | None:
    statement = update(FileRow).where(FileRow.id == file_id)
    if version is not None:
        statement = statement.where(FileRow.version == version)
    statement = (
        statement.values(version=FileRow.version + 1, **values)
        .returning(FileRow)
        # The session may hold the row from an earlier read; the returned values must replace it.
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    row = (await session.execute(statement)).scalar_one_or_none()
    return file_from_row(row) if row is not None else None


async def remove_file(session: AsyncSession, file_id: str, *, status: FileStatus | None = None) -> bool:
    """Delete the file's row, only while it has `status` when given; return whether a row was deleted."""
    statement = delete(FileRow).where(FileRow.id == file_id)
    if status is not None:
        statement = statement.where(FileRow.status == status.value)
    result = await session.execute(statement)
    return result.rowcount > 0


async def list_expired_uploads(session: AsyncSession, now: datetime, *, limit: int) -> list[File]:
    """List at most `limit` pending files whose upload expired before `now`, oldest expiry first."""
    statement = (
        select(FileRow)
        .where(FileRow.status == FileStatus.PENDING.value, FileRow.upload_expire_time < now)
        .order_by(FileRow.upload_expire_time)
        .limit(limit)
    )
    return [file_from_row(row) for row in (await session.execute(statement)).scalars()]


async def list_user_files(session: AsyncSession, uid: str) -> list[File]:
    """Return every file of `uid`, in any status."""
    statement = select(FileRow).where(FileRow.uid == uid)
    return [file_from_row(row) for row in (await session.execute(statement)).scalars()]


async def remove_user_files(session: AsyncSession, uid: str) -> int:
    """Delete every file row of a user and return how many there were."""
    result = await session.execute(delete(FileRow).where(FileRow.uid == uid))
    return result.rowcount


async def add_revoked_uploads(session: AsyncSession, uid: str, keys: list[str], delete_time: datetime) -> None:
    """Record upload keys of `uid` whose objects the sweeper deletes at `delete_time`.

    A key recorded before keeps the later of its two delete times.
    """
    for key in keys:
        row = await session.get(RevokedUploadRow, key)
        if row is None:
            session.add(RevokedUploadRow(key=key, uid=uid, delete_time=delete_time))
        elif row.delete_time < delete_time:
            row.delete_time = delete_time
    await session.flush()


async def list_due_revoked_uploads(session: AsyncSession, now: datetime, *, limit: int) -> list[str]:
    """List at most `limit` revoked upload keys whose delete time is not after `now`, earliest first."""
    statement = (
        select(RevokedUploadRow.key)
        .where(RevokedUploadRow.delete_time <= now)
        .order_by(RevokedUploadRow.delete_time)
        .limit(limit)
    )
    return list((await session.execute(statement)).scalars())


async def remove_revoked_uploads(session: AsyncSession, keys: list[str], now: datetime) -> int:
    """Delete the revoked upload rows of `keys` that are still due at `now`; return how many."""
    statement = delete(RevokedUploadRow).where(RevokedUploadRow.key.in_(keys), RevokedUploadRow.delete_time <= now)
    result = await session.execute(statement)
    return result.rowcount
