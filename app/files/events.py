"""The background work of files: event consumers and the periodic sweep of abandoned uploads.

- `files.process_upload` (FileUploaded): makes an image's thumbnail and its copy without metadata.
- `files.remove_objects` (FileDeleted): deletes the objects of a deleted file that storage could
  not delete at once.
- `files.user_deleted` (UserDeleted): deletes every object and row of a deleted user.

`UploadSweeper` removes pending uploads whose URL expired. The process that relays events runs
it: the web process by default, or `python -m app worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from functions.events.v1 import events_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from app.files import logic
from app.files.logic import Files
from app.platform.errors import ServiceError
from app.platform.events import Consumer, Event
from app.platform.storage.port import ObjectStorage

log = logging.getLogger(__name__)

PROCESS_UPLOAD_CONSUMER_NAME = "files.process_upload"
REMOVE_OBJECTS_CONSUMER_NAME = "files.remove_objects"
USER_DELETED_CONSUMER_NAME = "files.user_deleted"
# Sweeps run this often, or once per upload URL lifetime when that is shorter.
SWEEP_INTERVAL_SECONDS = 60.0


def file_consumers(storage: ObjectStorage) -> list[Consumer]:
    """Build the consumers of the files domain over `storage`."""

    async def process_upload(event: Event, session: AsyncSession) -> None:
        # The relay hands this consumer FileUploaded events only.
        uploaded = cast(events_pb2.FileUploaded, event.message)
        await logic.process_uploaded_file(session, storage, uploaded.file_id)

    async def remove_objects(event: Event, session: AsyncSession) -> None:
        deleted = cast(events_pb2.FileDeleted, event.message)
        await logic.remove_deleted_file_objects(storage, deleted.file_id, deleted.uid)

    async def remove_user_files(event: Event, session: AsyncSession) -> None:
        deleted = cast(events_pb2.UserDeleted, event.message)
        await logic.remove_user_files(session, storage, deleted.uid)

    return [
        Consumer(name=PROCESS_UPLOAD_CONSUMER_NAME, event_types=(events_pb2.FileUploaded,), handler=process_upload),
        Consumer(name=REMOVE_OBJECTS_CONSUMER_NAME, event_types=(events_pb2.FileDeleted,), handler=remove_objects),
        Consumer(name=USER_DELETED_CONSUMER_NAME, event_types=(events_pb2.UserDeleted,), handler=remove_user_files),
    ]


class UploadSweeper:
    """A task that calls `Files.sweep_abandoned_uploads` periodically until stopped."""

    def __init__(self, files: Files, *, interval_seconds: float | None = None) -> None:
        self._files = files
        self._interval_seconds = interval_seconds or min(
            SWEEP_INTERVAL_SECONDS, float(files.limits.upload_url_ttl_seconds)
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sweeping in the background."""
        self._task = asyncio.create_task(self._run(), name="files-upload-sweeper")

    async def stop(self) -> None:
        """Stop sweeping; a sweep in progress is cancelled and its unit of work rolled back."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_seconds)
            try:
                await self._files.sweep_abandoned_uploads()
            except ServiceError as error:
                # The next sweep tries again; the database may be back by then.
                log.warning("sweeping abandoned uploads failed: %s", error)
            except Exception:  # noqa: BLE001 - this task must outlive any failed sweep
                log.exception("sweeping abandoned uploads failed")
