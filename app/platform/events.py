"""Domain events: the transactional outbox, named consumers and the in-process relay.

A domain calls `record_event(session, message)` in the unit of work that changes its state, so
the event row commits or rolls back with that change. `EventRelay` polls committed rows that
are not yet published and hands each one to every consumer subscribed to its type, at least
once. A consumer's handler and its `processed_events` row commit in one transaction, so a
repeated delivery finds the row and skips the handler. A failing handler is retried with
exponential backoff and full jitter, and after `max_attempts` failures the event gets a
`dead_letters` row that `replay_dead_letter` runs again.

Payloads are protobuf messages, stored serialized with their full type name.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import Message
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from sqlalchemy import (
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from app.platform.context import current_principal, current_request_id, request_id_var
from app.platform.db import Base, Database, UtcDateTime, insert_ignoring_conflicts
from app.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidInput,
    NotFound,
)

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# A consumer that fails this many times in a row for one event gets a dead letter for it.
MAX_ATTEMPTS = 5
# Retry n waits a random time between 0 and min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2**(n-1)).
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 60.0
POLL_INTERVAL_SECONDS = 0.5
FAILURE_LOG_INTERVAL_SECONDS = 30.0
BATCH_SIZE = 100
# Time the relay gets at shutdown to deliver what is committed but not yet published.
FLUSH_TIMEOUT_SECONDS = 5.0
CONSUMER_NAME_MAX_LENGTH = 128
# Dead letters keep the start of the error text, and the traceback goes to the log.
ERROR_MAX_LENGTH = 2000


class OutboxEventRow(Base):
    """One row of `outbox_events`: an event committed with the state change it describes."""

    __tablename__ = "outbox_events"
    # The relay reads unpublished rows oldest first.
    __table_args__ = (Index("ix_outbox_events_published_at_occurred_at", "published_at", "occurred_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Full protobuf name of the payload, such as functions.events.v1.UserCreated.
    type: Mapped[str] = mapped_column(String(255))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Empty when no signed-in caller made the change.
    actor_uid: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(128))
    # W3C trace context of the span that recorded the event, empty outside a trace.
    traceparent: Mapped[str] = mapped_column(String(256))
    # Set when every subscribed consumer processed the event or dead-lettered it.
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Failed handler runs of every consumer, counted for inspection.
    attempts: Mapped[int] = mapped_column(Integer)


class ProcessedEventRow(Base):
    """One row of `processed_events`: a consumer handled an event, so it never handles it again."""

    __tablename__ = "processed_events"

    consumer: Mapped[str] = mapped_column(String(CONSUMER_NAME_MAX_LENGTH), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class DeadLetterRow(Base):
    """One row of `dead_letters`: a consumer gave up on an event after its last failed attempt."""

    __tablename__ = "dead_letters"

    consumer: Mapped[str] = mapped_column(String(CONSUMER_NAME_MAX_LENGTH), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


@dataclass(frozen=True, slots=True)
class Event:
    """An event as a consumer receives it: the decoded payload and where it came from."""

    id: str
    type: str
    message: Message
    occurred_at: datetime
    actor_uid: str
    request_id: str
    traceparent: str


EventHandler = Callable[[Event, AsyncSession], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Consumer:
    """A named subscriber to some event types.

    The handler runs in the transaction that records the event as processed for this consumer,
    so its database writes and that record commit together. Renaming a consumer makes it
    receive again every event that is still unpublished.
    """

    name: str
    event_types: tuple[type[Message], ...]
    handler: EventHandler

    @property
    def type_names(self) -> frozenset[str]:
        return frozenset(message_type.DESCRIPTOR.full_name for message_type in self.event_types)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-letter record with the type of its event."""

    consumer: str
    event_id: str
    event_type: str
    error: str
    attempts: int
    created_at: datetime


@dataclass(slots=True)
class _Retry:
    attempts: int
    due_at: float


async def record_event(session: AsyncSession, message: Message, *, now: datetime | None = None) -> str:
    """Add an outbox row for `message` in the caller's transaction and return the event id.

    The acting uid, request id and trace context come from the current request. Nothing is
    committed here: the row commits or rolls back with the caller's unit of work.
    """
    principal = current_principal()
    event_id = str(uuid.uuid4())
    await session.execute(
        insert(OutboxEventRow).values(
            id=event_id,
            type=message.DESCRIPTOR.full_name,
            payload=message.SerializeToString(),
            occurred_at=now or datetime.now(UTC),
            actor_uid=principal.uid if principal is not None else "",
            request_id=current_request_id() or "",
            traceparent=_current_traceparent(),
            published_at=None,
            attempts=0,
        )
    )
    return event_id


async def list_dead_letters(session: AsyncSession, *, limit: int = 100) -> list[DeadLetter]:
    """List at most `limit` dead letters, oldest first."""
    statement = (
        select(DeadLetterRow, OutboxEventRow.type)
        .outerjoin(OutboxEventRow, OutboxEventRow.id == DeadLetterRow.event_id)
        .order_by(DeadLetterRow.created_at, DeadLetterRow.consumer, DeadLetterRow.event_id)
        .limit(limit)
    )
    rows = (await session.execute(statement)).all()
    return [
        DeadLetter(
            consumer=row.consumer,
            event_id=row.event_id,
            event_type=event_type or "",
            error=row.error,
            attempts=row.attempts,
            created_at=row.created_at,
        )
        for row, event_type in rows
    ]


class EventRelay:
    """Delivers committed outbox events to the consumers of one process.

    `start` runs a polling task and `stop` ends it, then delivers what is already committed.
    Retry schedules live in memory: after a restart every consumer that had not finished an
    event starts again from its first attempt.
    """

    def __init__(
        self,
        database: Database,
        consumers: Sequence[Consumer],
        *,
        batch_size: int = BATCH_SIZE,
        poll_interval_seconds: float = POLL_INTERVAL_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_base_seconds: float = BACKOFF_BASE_SECONDS,
        backoff_max_seconds: float = BACKOFF_MAX_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        _check_consumers(consumers)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1: got {max_attempts}")
        self._database = database
        self._consumers = {consumer.name: consumer for consumer in consumers}
        self._message_types = {
            message_type.DESCRIPTOR.full_name: message_type
            for consumer in consumers
            for message_type in consumer.event_types
        }
        self._batch_size = batch_size
        self._poll_interval_seconds = poll_interval_seconds
        self._max_attempts = max_attempts
        self._backoff_base_seconds = backoff_base_seconds
        self._backoff_max_seconds = backoff_max_seconds
        self._clock = clock
        self._jitter = jitter
        self._retries: dict[tuple[str, str], _Retry] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling in a background task of the running event loop."""
        if self._task is not None:
            raise RuntimeError("the event relay is already running")
        self._stopping.clear()
        self._task = asyncio.create_task(self.run(), name="event-relay")
        log.info("event relay started", extra={"consumers": sorted(self._consumers)})

    async def stop(self, flush_timeout_seconds: float = FLUSH_TIMEOUT_SECONDS) -> None:
        """Stop polling, then deliver the events committed so far within `flush_timeout_seconds`."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        try:
            await asyncio.wait_for(self._flush(), flush_timeout_seconds)
        except TimeoutError:
            log.warning("event relay stopped before delivering every event", extra={"timeout_seconds": flush_timeout_seconds})
        except Exception:
            log.exception("event relay failed to deliver events at shutdown")
        log.info("event relay stopped")

    async def run(self) -> None:
        """Poll and deliver until `stop` is called."""
        last_failure_log = float("-inf")
        while not self._stopping.is_set():
            published = 0
            try:
                published = await self.run_once()
            except Exception:
                # Typically Unavailable while the database is down. The next pass tries again;
                # the failure is logged once per FAILURE_LOG_INTERVAL_SECONDS, not every pass.
                if self._clock() - last_failure_log >= FAILURE_LOG_INTERVAL_SECONDS:
                    last_failure_log = self._clock()
                    log.exception("event relay pass failed; retrying", extra={"poll_interval_seconds": self._poll_interval_seconds})
            if published == self._batch_size:
                continue
            try:
                await asyncio.wait_for(self._stopping.wait(), self._poll_interval_seconds)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """Deliver one batch of committed, unpublished events and return how many were published."""
        # NOTE: occurred_at is the time of recording, not of commit, so events are delivered in
        # about the order they happened. A full batch of events waiting for retries delays newer
        # events until those are processed or dead-lettered.
        async with self._database.unit_of_work() as session:
            statement = (
                select(OutboxEventRow)
                .where(OutboxEventRow.published_at.is_(None))
                .order_by(OutboxEventRow.occurred_at, OutboxEventRow.id)
                .limit(self._batch_size)
            )
            rows = list((await session.execute(statement)).scalars())
        if not rows:
            return 0

        finished = await self._finished_pairs([row.id for row in rows])
        published: list[str] = []
        for row in rows:
            subscribers = [consumer for consumer in self._consumers.values() if row.type in consumer.type_names]
            for consumer in subscribers:
                if (consumer.name, row.id) not in finished and await self._deliver(consumer, row):
                    finished.add((consumer.name, row.id))
            if all((consumer.name, row.id) in finished for consumer in subscribers):
                published.append(row.id)

        if published:
            async with self._database.unit_of_work() as session:
                await session.execute(
                    update(OutboxEventRow)
                    .where(OutboxEventRow.id.in_(published))
                    .values(published_at=datetime.now(UTC))
                    .execution_options(synchronize_session=False)
                )
        return len(published)

    async def replay_dead_letter(self, consumer_name: str, event_id: str) -> None:
        """Run a dead-lettered event through its consumer again and remove the dead letter on success.

        Raise NotFound when the consumer, the dead letter or the event is missing. Raise
        FailedPrecondition when the handler fails again, after adding the attempt to the dead letter.
        """
        consumer = self._consumers.get(consumer_name)
        if consumer is None:
            raise NotFound(f"consumer {consumer_name!r} is not registered: registered are {sorted(self._consumers)}")

        try:
            async with self._database.unit_of_work() as session:
                dead_letter = await session.get(DeadLetterRow, (consumer_name, event_id))
                if dead_letter is None:
                    raise NotFound(f"dead letter of event {event_id} for consumer {consumer_name} not found")
                row = await session.get(OutboxEventRow, event_id)
                if row is None:
                    raise NotFound(f"event {event_id} not found in the outbox")

                await session.delete(dead_letter)
                await self._handle(session, consumer, self._decode(row))
        except NotFound:
            raise
        except Exception as error:
            await self._count_dead_letter_attempt(consumer_name, event_id, error)
            raise FailedPrecondition(
                f"replay of event {event_id} by consumer {consumer_name} failed: {_error_text(error)}"
            ) from error
        log.info("dead letter replayed", extra={"consumer": consumer_name, "event_id": event_id})

    async def _flush(self) -> None:
        # A pass that publishes less than a full batch has found every ready event, because the
        # rest are waiting for a retry.
        while await self.run_once() == self._batch_size:
            pass

    async def _finished_pairs(self, event_ids: list[str]) -> set[tuple[str, str]]:
        names = list(self._consumers)
        async with self._database.unit_of_work() as session:
            processed = await session.execute(
                select(ProcessedEventRow.consumer, ProcessedEventRow.event_id).where(
                    ProcessedEventRow.event_id.in_(event_ids), ProcessedEventRow.consumer.in_(names)
                )
            )
            dead = await session.execute(
                select(DeadLetterRow.consumer, DeadLetterRow.event_id).where(
                    DeadLetterRow.event_id.in_(event_ids), DeadLetterRow.consumer.in_(names)
                )
            )
            return {(consumer, event_id) for consumer, event_id in [*processed, *dead]}

    async def _deliver(self, consumer: Consumer, row: OutboxEventRow) -> bool:
        """Run one attempt unless a retry is not due yet; return whether the consumer is done with the event."""
        key = (consumer.name, row.id)
        retry = self._retries.get(key)
        if retry is not None and retry.due_at > self._clock():
            return False

        try:
            async with self._database.unit_of_work() as session:
                await self._handle(session, consumer, self._decode(row))
        except Exception as error:
            return await self._record_failure(consumer, row, error, retry.attempts if retry else 0)
        self._retries.pop(key, None)
        return True

    async def _handle(self, session: AsyncSession, consumer: Consumer, event: Event) -> None:
        # The processed row goes first. When another relay has inserted it, the insert waits for
        # that transaction and then inserts nothing, so the handler is skipped instead of running twice.
        if not await _insert_processed(session, consumer.name, event.id):
            log.debug("event already processed", extra={"consumer": consumer.name, "event_id": event.id})
            return

        parent = propagate.extract({"traceparent": event.traceparent}) if event.traceparent else None
        request_id_token = request_id_var.set(event.request_id or None)
        try:
            with _tracer.start_as_current_span(
                f"{event.type} process",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes={"messaging.consumer.group.name": consumer.name, "messaging.message.id": event.id},
            ):
                await consumer.handler(event, session)
        finally:
            request_id_var.reset(request_id_token)

    async def _record_failure(self, consumer: Consumer, row: OutboxEventRow, error: Exception, previous_attempts: int) -> bool:
        key = (consumer.name, row.id)
        attempts = previous_attempts + 1
        async with self._database.unit_of_work() as session:
            await session.execute(
                update(OutboxEventRow)
                .where(OutboxEventRow.id == row.id)
                .values(attempts=OutboxEventRow.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            if attempts >= self._max_attempts:
                await _upsert_dead_letter(session, consumer.name, row.id, _error_text(error), attempts)

        details = {"consumer": consumer.name, "event_id": row.id, "event_type": row.type, "attempt": attempts}
        if attempts >= self._max_attempts:
            self._retries.pop(key, None)
            log.error("event consumer failed on its last attempt; event dead-lettered", exc_info=error, extra=details)
            return True

        # Full jitter: a random wait up to the exponential bound spreads retries of many events.
        bound = min(self._backoff_max_seconds, self._backoff_base_seconds * 2 ** (attempts - 1))
        delay = self._jitter() * bound
        self._retries[key] = _Retry(attempts=attempts, due_at=self._clock() + delay)
        log.warning(
            "event consumer failed; retrying",
            extra={**details, "retry_in_seconds": round(delay, 3), "error_type": type(error).__name__},
        )
        return False

    async def _count_dead_letter_attempt(self, consumer_name: str, event_id: str, error: Exception) -> None:
        async with self._database.unit_of_work() as session:
            await session.execute(
                update(DeadLetterRow)
                .where(DeadLetterRow.consumer == consumer_name, DeadLetterRow.event_id == event_id)
                .values(attempts=DeadLetterRow.attempts + 1, error=_error_text(error))
                .execution_options(synchronize_session=False)
            )
        log.error("dead letter replay failed", exc_info=error, extra={"consumer": consumer_name, "event_id": event_id})

    def _decode(self, row: OutboxEventRow) -> Event:
        message_type = self._message_types.get(row.type)
        if message_type is None:
            raise LookupError(f"no consumer of this relay subscribes to event type {row.type}")
        return Event(
            id=row.id,
            type=row.type,
            message=message_type.FromString(row.payload),
            occurred_at=row.occurred_at,
            actor_uid=row.actor_uid,
            request_id=row.request_id,
            traceparent=row.traceparent,
        )


def _check_consumers(consumers: Iterable[Consumer]) -> None:
    violations: list[FieldViolation] = []
    seen: set[str] = set()
    for consumer in consumers:
        if not consumer.name or len(consumer.name) > CONSUMER_NAME_MAX_LENGTH:
            violations.append(
                FieldViolation("consumer.name", f"must be 1 to {CONSUMER_NAME_MAX_LENGTH} characters: got {consumer.name!r}")
            )
        if consumer.name in seen:
            violations.append(FieldViolation("consumer.name", f"must be unique: got {consumer.name!r} twice"))
        if not consumer.event_types:
            violations.append(FieldViolation("consumer.event_types", f"must not be empty: consumer {consumer.name!r}"))
        seen.add(consumer.name)
    if violations:
        raise InvalidInput(violations)


async def _insert_processed(session: AsyncSession, consumer_name: str, event_id: str) -> bool:
    values = {"consumer": consumer_name, "event_id": event_id, "processed_at": datetime.now(UTC)}
    statement = insert_ignoring_conflicts(session, ProcessedEventRow, values)
    result = await session.execute(statement)
    return result.rowcount == 1


async def _upsert_dead_letter(session: AsyncSession, consumer_name: str, event_id: str, error: str, attempts: int) -> None:
    # A dead letter left by an earlier run of this pair is replaced by the newer failure.
    await session.execute(
        delete(DeadLetterRow)
        .where(DeadLetterRow.consumer == consumer_name, DeadLetterRow.event_id == event_id)
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        insert(DeadLetterRow).values(
            consumer=consumer_name, event_id=event_id, error=error, attempts=attempts, created_at=datetime.now(UTC)
        )
    )


def _current_traceparent() -> str:
    carrier: dict[str, str] = {}
    # The global propagator writes nothing when no valid span is current.
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:ERROR_MAX_LENGTH]
