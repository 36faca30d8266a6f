"""The pgmq event engine: outbox events go through one pgmq queue per consumer, for many processes.

With EVENTS_ENGINE=pgmq, `PgmqEventRelay` runs two steps in each pass:

1. Relay: committed outbox rows that are not yet published are locked with SKIP LOCKED, one
   `pgmq.send` per subscribed consumer puts the event id on that consumer's queue, and the row is
   marked published, all in one transaction. A crash before the commit leaves the row unpublished,
   so it is sent again and never lost.
2. Work: each consumer's queue is read with `pgmq.read(queue, vt, qty)`, which hides the messages
   from other readers for the visibility timeout. The handler, the `processed_events` insert and
   `pgmq.delete` commit in one transaction. A failing handler rolls back, so the message reappears
   after the visibility timeout; that is the retry, and pgmq's `read_ct` counts the attempts. After
   `max_attempts` reads the event gets a `dead_letters` row and the message is archived.

Queues need the pgmq SQL in the database: `create extension pgmq` on Supabase, or the
`pgmq/sql/pgmq.sql` file of the pgmq package on plain PostgreSQL. SQLite has no pgmq. Every
process creates the queues of its consumers on its first pass, under an advisory lock so that
processes starting together do not collide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from app.platform.db import Database
from app.platform.events import (
    BATCH_SIZE,
    MAX_ATTEMPTS,
    POLL_INTERVAL_SECONDS,
    Consumer,
    EventRelay,
    OutboxEventRow,
    _error_text,
    _upsert_dead_letter,
)
from app.settings import Settings

log = logging.getLogger(__name__)

# Seconds a read message stays hidden from other readers. A handler that runs longer than this
# may run a second time in another process, and the processed_events row then skips it there.
VISIBILITY_TIMEOUT_SECONDS = 30
# pgmq rejects queue names longer than 47 characters (pgmq 1.13 validate_queue_name).
QUEUE_NAME_MAX_LENGTH = 47
_QUEUE_PREFIX = "events_"
_QUEUE_NAME_HASH_LENGTH = 8

_SEND = text("select pgmq.send(cast(:queue as text), cast(:message as jsonb))")
_READ = text(
    "select msg_id, read_ct, message ->> 'event_id' as event_id"
    " from pgmq.read(cast(:queue as text), cast(:vt as integer), cast(:qty as integer))"
)
_DELETE = text("select pgmq.delete(cast(:queue as text), cast(:msg_id as bigint))")
_ARCHIVE = text("select pgmq.archive(cast(:queue as text), cast(:msg_id as bigint))")
_CREATE = text("select pgmq.create(cast(:queue as text))")
# Key of the transaction-scoped advisory lock that every process takes before creating queues:
# the first 8 bytes of SHA-256("functions.pgmq.create") as a signed 64-bit integer.
QUEUE_CREATION_LOCK_KEY = int.from_bytes(hashlib.sha256(b"functions.pgmq.create").digest()[:8], "big", signed=True)
_LOCK_QUEUE_CREATION = text("select pg_advisory_xact_lock(cast(:key as bigint))")


def queue_name(consumer_name: str) -> str:
    """Derive the pgmq queue name of a consumer: lowercase, at most 47 characters, stable across processes.

    Consumer names may be 128 characters of any kind, so the name keeps a readable prefix
    and ends with a hash of the full consumer name that keeps distinct consumers apart.
    """
    digest = hashlib.sha256(consumer_name.encode()).hexdigest()[:_QUEUE_NAME_HASH_LENGTH]
    readable_length = QUEUE_NAME_MAX_LENGTH - len(_QUEUE_PREFIX) - 1 - _QUEUE_NAME_HASH_LENGTH
    readable = re.sub(r"[^a-z0-9_]", "_", consumer_name.lower())[:readable_length]
    return f"{_QUEUE_PREFIX}{readable}_{digest}"


def check_events_engine(settings: Settings) -> None:
    """Raise ValueError when EVENTS_ENGINE=pgmq is set with a database that has no pgmq."""
    if settings.events_engine != "pgmq":
        return
    backend = make_url(settings.database_url).get_backend_name()
    if backend != "postgresql":
        raise ValueError(
            f"EVENTS_ENGINE=pgmq needs a PostgreSQL DATABASE_URL, but got a {backend} URL: "
            "set EVENTS_ENGINE=inprocess or point DATABASE_URL at PostgreSQL with pgmq installed"
        )


def create_relay(settings: Settings, database: Database, consumers: Sequence[Consumer]) -> EventRelay:
    """Create the relay of the configured EVENTS_ENGINE, or raise ValueError when the database cannot run it."""
    check_events_engine(settings)
    if settings.events_engine == "pgmq":
        return PgmqEventRelay(database, consumers, visibility_timeout_seconds=settings.events_visibility_timeout_seconds)
    return EventRelay(database, consumers)


class PgmqEventRelay(EventRelay):
    """Delivers outbox events through pgmq queues, so several processes can share the work.

    `start`, `stop`, `run` and `replay_dead_letter` behave as in `EventRelay`. At `stop` the relay
    moves committed events into their queues, and messages it has read but not finished come back
    to any worker after the visibility timeout.
    """

    def __init__(
        self,
        database: Database,
        consumers: Sequence[Consumer],
        *,
        batch_size: int = BATCH_SIZE,
        poll_interval_seconds: float = POLL_INTERVAL_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        visibility_timeout_seconds: int = VISIBILITY_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(
            database,
            consumers,
            batch_size=batch_size,
            poll_interval_seconds=poll_interval_seconds,
            max_attempts=max_attempts,
        )
        if visibility_timeout_seconds < 1:
            raise ValueError(f"visibility_timeout_seconds must be at least 1: got {visibility_timeout_seconds}")
        self._visibility_timeout_seconds = visibility_timeout_seconds
        self._queues = {consumer.name: queue_name(consumer.name) for consumer in consumers}
        self._queues_created = False

    async def create_queues(self) -> None:
        """Create the queue of every consumer, keeping queues that exist already.

        Safe while other processes create the same queues, because creators take turns under an advisory lock.
        """
        async with self._database.unit_of_work() as session:
            # The lock below only works under READ COMMITTED, where each statement reads the rows
            # committed before it started, so the level is set here whatever the server default is.
            await session.connection(execution_options={"isolation_level": "READ COMMITTED"})
            # pgmq.create runs CREATE TABLE IF NOT EXISTS and inserts into pgmq.meta. When two
            # sessions create the same new queue at once, both find no table and the second fails
            # with a unique violation on pg_type or pg_class. pgmq 1.5.2 and later lock each queue
            # inside pgmq.create, but older releases do not. Holding this lock until commit makes
            # creators wait for each other, so the next one finds the tables and creates nothing.
            await session.execute(_LOCK_QUEUE_CREATION, {"key": QUEUE_CREATION_LOCK_KEY})
            for queue in self._queues.values():
                await session.execute(_CREATE, {"queue": queue})
        self._queues_created = True

    async def run_once(self) -> int:
        """Relay one batch of outbox rows into the queues, then work one batch of each queue.

        Return the number of outbox rows relayed plus messages taken off the queues.
        """
        if not self._queues_created:
            await self.create_queues()
        relayed = await self.relay_once()
        worked = 0
        for consumer in self._consumers.values():
            worked += await self.work_once(consumer)
        return relayed + worked

    async def relay_once(self) -> int:
        """Send one batch of committed, unpublished events to their consumers' queues and mark them published."""
        async with self._database.unit_of_work() as session:
            # SKIP LOCKED lets relays of other processes take the next rows instead of sending these twice.
            statement = (
                select(OutboxEventRow)
                .where(OutboxEventRow.published_at.is_(None))
                .order_by(OutboxEventRow.occurred_at, OutboxEventRow.id)
                .limit(self._batch_size)
                .with_for_update(skip_locked=True)
            )
            rows = list((await session.execute(statement)).scalars())
            if not rows:
                return 0

            for row in rows:
                # NOTE: an event type no consumer of this process subscribes to is marked
                # published without being sent, as the in-process relay does.
                for consumer in self._consumers.values():
                    if row.type in consumer.type_names:
                        message = json.dumps({"event_id": row.id})
                        await session.execute(_SEND, {"queue": self._queues[consumer.name], "message": message})
            await session.execute(
                update(OutboxEventRow)
                .where(OutboxEventRow.id.in_([row.id for row in rows]))
                .values(published_at=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            )
        return len(rows)

    async def work_once(self, consumer: Consumer) -> int:
        """Read and handle up to a batch of `consumer`'s messages, one at a time; return how many were read.

        Each message is read just before it is handled, so its read count is the number of
        attempts at it. Reading a whole batch at once would count a read against every message in
        it when the worker crashes on one, and dead-letter the others unhandled.
        """
        queue = self._queues[consumer.name]
        read = 0
        while read < self._batch_size:
            async with self._database.unit_of_work() as session:
                parameters = {"queue": queue, "vt": self._visibility_timeout_seconds, "qty": 1}
                message = (await session.execute(_READ, parameters)).first()
            if message is None:
                break
            read += 1
            await self._process(consumer, queue, message.msg_id, message.read_ct, message.event_id)
        return read

    async def _flush(self) -> None:
        # Handling is left to the next worker that reads the queues, so shutdown only has to move
        # committed events into them.
        while await self.relay_once() == self._batch_size:
            pass

    async def _process(self, consumer: Consumer, queue: str, msg_id: int, read_count: int, event_id: str) -> None:
        details = {"consumer": consumer.name, "event_id": event_id, "msg_id": msg_id, "attempt": read_count}
        async with self._database.unit_of_work() as session:
            row = await session.get(OutboxEventRow, event_id)
        if row is None:
            log.error("queued event not found in the outbox; message archived", extra=details)
            await self._archive(queue, msg_id)
            return

        if read_count > self._max_attempts:
            # A worker that dies inside the handler never records a failure, so the read count is
            # the only sign of an event that keeps crashing workers.
            error = RuntimeError(f"no attempt finished in {read_count - 1} reads, so workers probably crashed in the handler")
            await self._dead_letter(consumer, queue, msg_id, row, error, read_count - 1)
            return

        try:
            async with self._database.unit_of_work() as session:
                await self._handle(session, consumer, self._decode(row))
                await session.execute(_DELETE, {"queue": queue, "msg_id": msg_id})
        except Exception as error:
            if read_count >= self._max_attempts:
                await self._dead_letter(consumer, queue, msg_id, row, error, read_count)
                return
            await self._count_attempt(row.id)
            log.warning(
                "event consumer failed; retrying after the visibility timeout",
                extra={**details, "retry_in_seconds": self._visibility_timeout_seconds, "error_type": type(error).__name__},
            )

    async def _dead_letter(
        self, consumer: Consumer, queue: str, msg_id: int, row: OutboxEventRow, error: Exception, attempts: int
    ) -> None:
        async with self._database.unit_of_work() as session:
            await session.execute(
                update(OutboxEventRow)
                .where(OutboxEventRow.id == row.id)
                .values(attempts=OutboxEventRow.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            await _upsert_dead_letter(session, consumer.name, row.id, _error_text(error), attempts)
            await session.execute(_ARCHIVE, {"queue": queue, "msg_id": msg_id})
        log.error(
            "event consumer failed on its last attempt; event dead-lettered",
            exc_info=error,
            extra={"consumer": consumer.name, "event_id": row.id, "event_type": row.type, "msg_id": msg_id, "attempt": attempts},
        )

    async def _count_attempt(self, event_id: str) -> None:
        async with self._database.unit_of_work() as session:
            await session.execute(
                update(OutboxEventRow)
                .where(OutboxEventRow.id == event_id)
                .values(attempts=OutboxEventRow.attempts + 1)
                .execution_options(synchronize_session=False)
            )

    async def _archive(self, queue: str, msg_id: int) -> None:
        async with self._database.unit_of_work() as session:
            await session.execute(_ARCHIVE, {"queue": queue, "msg_id": msg_id})
