"""Limits on the calls that hold a whole file in memory: Upload and CompleteUpload.

A CompleteUpload takes a slot before it reads any bytes, and an Upload when its first chunk
arrives, so a stream that sends its metadata and then nothing takes no slot. Either gives the
slot back when it ends. When no slot is free, the call fails at once with `resource_exhausted`
instead of waiting, so a client cannot pile up buffered uploads in a queue. The counts are per
process: each process of a deployment has its own slots.

An Upload stream fails with `deadline_exceeded` when its next chunk does not arrive within
UPLOAD_CHUNK_IDLE_SECONDS, or when it has not ended within max(UPLOAD_MIN_SECONDS, maximum file
size / UPLOAD_MIN_BYTES_PER_SECOND). So neither a stalled nor a trickling client keeps its slot
until the server's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator

from app.platform.errors import Aborted, DeadlineExceeded, ResourceExhausted

DEFAULT_MAX_PER_USER = 2
DEFAULT_MAX_PER_PROCESS = 8
# The maximum wait for the next chunk of an Upload stream that carries bytes. Chunks of 0 bytes
# do not count, so they cannot keep a stalled stream alive. Read on every wait, so tests can
# change it.
UPLOAD_CHUNK_IDLE_SECONDS = 15.0
# Every Upload stream may take this long, and a larger one as long as its maximum size needs at
# this rate. Read on every call, so tests can change them.
UPLOAD_MIN_SECONDS = 30.0
UPLOAD_MIN_BYTES_PER_SECOND = 64 * 1024


async def chunks_in_time(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """Yield the non-empty chunks of an Upload stream of at most `max_bytes`, as long as they come in time.

    Each chunk must come within UPLOAD_CHUNK_IDLE_SECONDS of the previous one, and the stream
    must end within max(UPLOAD_MIN_SECONDS, max_bytes / UPLOAD_MIN_BYTES_PER_SECOND).

    Raises:
        DeadlineExceeded: a chunk or the end of the stream came too late; the wait for `chunks` is cancelled.
    """
    loop = asyncio.get_running_loop()
    total_seconds = max(UPLOAD_MIN_SECONDS, max_bytes / UPLOAD_MIN_BYTES_PER_SECOND)
    stream_deadline = loop.time() + total_seconds
    iterator = aiter(chunks)
    while True:
        idle_seconds = UPLOAD_CHUNK_IDLE_SECONDS
        chunk_deadline = loop.time() + idle_seconds
        try:
            async with asyncio.timeout_at(min(chunk_deadline, stream_deadline)):
                chunk = b""
                while not chunk:
                    chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if chunk_deadline <= stream_deadline:
                raise DeadlineExceeded(
                    f"upload stream stalled: no chunk arrived for {idle_seconds:g} seconds; send the chunks without pauses",
                    reason="UPLOAD_STALLED",
                ) from None
            raise DeadlineExceeded(
                f"upload stream too slow: it must end within {total_seconds:g} seconds; "
                f"send at least {UPLOAD_MIN_BYTES_PER_SECOND // 1024} KiB per second",
                reason="UPLOAD_TOO_SLOW",
            ) from None
        yield chunk


class UploadSlots:
    """Counts the Upload and CompleteUpload calls in progress, per user, per process and per file."""

    def __init__(self, *, max_per_user: int = DEFAULT_MAX_PER_USER, max_per_process: int = DEFAULT_MAX_PER_PROCESS) -> None:
        if max_per_user < 1 or max_per_process < 1:
            raise ValueError(f"upload slot limits must be at least 1: got {max_per_user} per user, {max_per_process} per process")
        self.max_per_user = max_per_user
        self.max_per_process = max_per_process
        self._per_user: Counter[str] = Counter()
        self._completing: set[str] = set()

    @property
    def in_use(self) -> int:
        return self._per_user.total()

    @contextlib.contextmanager
    def hold(self, uid: str, *, completing: str | None = None) -> Iterator[None]:
        """Hold one slot of `uid` for the block, and with `completing`, the only completion of that file id.

        Raises:
            Aborted: another call is completing the file `completing` in this process.
            ResourceExhausted: `uid` or the process has no free slot.
        """
        # Nothing below awaits, so checking and taking the slot cannot interleave with another task.
        if completing is not None and completing in self._completing:
            raise Aborted(f"a completion of file {completing} is in progress; retry once it has finished")
        if self._per_user[uid] >= self.max_per_user:
            raise ResourceExhausted(
                f"too many uploads in progress: {self._per_user[uid]} of {self.max_per_user} per user; "
                "retry once one has finished",
                reason="TOO_MANY_UPLOADS",
            )
        if self.in_use >= self.max_per_process:
            raise ResourceExhausted(
                f"too many uploads in progress on this server: {self.in_use} of {self.max_per_process}; retry later",
                reason="SERVER_UPLOADS_BUSY",
            )

        self._per_user[uid] += 1
        if completing is not None:
            self._completing.add(completing)
        try:
            yield
        finally:
            self._per_user[uid] -= 1
            if self._per_user[uid] <= 0:
                del self._per_user[uid]
            if completing is not None:
                self._completing.discard(completing)
