"""Event backbone: outbox rows commit with the state change, and the relay delivers them once.

Every test runs on SQLite and Postgres. The databases are shared by the tests of a session, so
each test uses its own uids and its consumers ignore events of other uids.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import pytest
from functions.events.v1 import events_pb2
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy import select, update

from app.platform.context import Principal, principal_var, request_id_var
from app.platform.db import Database
from app.platform.errors import FailedPrecondition, NotFound
from app.platform.events import (
    Consumer,
    DeadLetterRow,
    Event,
    EventRelay,
    OutboxEventRow,
    ProcessedEventRow,
    list_dead_letters,
    record_event,
)
from app.users import logic, store
from tests.integration.factories import new_profile

DEADLINE_SECONDS = 10.0


def new_uid() -> str:
    return f"events-{secrets.token_hex(6)}"


def counting_consumer(uid: str, effects: list[str], *, failures: int = 0, name: str = "") -> Consumer:
    """Build a UserDeleted consumer that raises `failures` times for `uid`, then appends the event id to `effects`."""
    remaining = [failures]

    async def handle(event: Event, session) -> None:
        if event.message.uid != uid:
            return
        if remaining[0] != 0:
            remaining[0] -= 1
            raise RuntimeError(f"consumer failed on purpose for {uid}")
        effects.append(event.id)

    return Consumer(name or f"counter-{uid}", (events_pb2.UserDeleted,), handle)


def fast_relay(database: Database, consumers: list[Consumer], **options: object) -> EventRelay:
    return EventRelay(database, consumers, backoff_base_seconds=0.01, backoff_max_seconds=0.05, poll_interval_seconds=0.01, **options)


async def record_deleted(database: Database, uid: str) -> str:
    async with database.unit_of_work() as session:
        return await record_event(session, events_pb2.UserDeleted(uid=uid))


async def load_event(database: Database, event_id: str) -> OutboxEventRow | None:
    async with database.unit_of_work() as session:
        return await session.get(OutboxEventRow, event_id, populate_existing=True)


async def run_until(relay: EventRelay, condition: Callable[[], object]) -> None:
    """Run relay passes until `condition` returns true, failing after DEADLINE_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while not await condition():
        assert loop.time() < deadline, "the relay did not reach the expected state in time"
        await relay.run_once()
        await asyncio.sleep(0.005)


def published(database: Database, event_id: str) -> Callable[[], object]:
    async def check() -> bool:
        row = await load_event(database, event_id)
        return row is not None and row.published_at is not None

    return check


async def test_event_commits_with_state_change(database: Database) -> None:
    uid = new_uid()

    async with database.unit_of_work() as session:
        await store.add_user(session, new_profile(uid))
        event_id = await record_event(session, events_pb2.UserDeleted(uid=uid))

    row = await load_event(database, event_id)
    assert row is not None
    assert row.type == "functions.events.v1.UserDeleted"
    assert events_pb2.UserDeleted.FromString(row.payload).uid == uid
    assert row.published_at is None
    assert row.attempts == 0


async def test_event_disappears_with_rollback(database: Database) -> None:
    uid = new_uid()
    recorded: list[str] = []

    with pytest.raises(RuntimeError):
        async with database.unit_of_work() as session:
            await store.add_user(session, new_profile(uid))
            recorded.append(await record_event(session, events_pb2.UserDeleted(uid=uid)))
            raise RuntimeError("roll back")

    assert await load_event(database, recorded[0]) is None
    async with database.unit_of_work() as session:
        assert await store.find_user(session, uid) is None


async def test_event_carries_actor_request_and_trace(database: Database) -> None:
    uid = new_uid()
    span_context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    principal_token = principal_var.set(Principal(uid=uid))
    request_token = request_id_var.set("request-0001")
    try:
        with trace.use_span(NonRecordingSpan(span_context)):
            event_id = await record_deleted(database, uid)
    finally:
        principal_var.reset(principal_token)
        request_id_var.reset(request_token)

    row = await load_event(database, event_id)
    assert row.actor_uid == uid
    assert row.request_id == "request-0001"
    assert row.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_event_outside_request_has_empty_origin(database: Database) -> None:
    event_id = await record_deleted(database, new_uid())

    row = await load_event(database, event_id)
    assert row.actor_uid == ""
    assert row.request_id == ""
    assert row.traceparent == ""


async def test_relay_delivers_once_when_run_twice(database: Database) -> None:
    uid = new_uid()
    effects: list[str] = []
    consumer = counting_consumer(uid, effects)
    relay = fast_relay(database, [consumer])
    event_id = await record_deleted(database, uid)

    await run_until(relay, published(database, event_id))
    await relay.run_once()

    assert effects == [event_id]
    async with database.unit_of_work() as session:
        processed = await session.get(ProcessedEventRow, (consumer.name, event_id))
    assert processed is not None


async def test_relay_skips_duplicate_delivery(database: Database) -> None:
    uid = new_uid()
    effects: list[str] = []
    consumer = counting_consumer(uid, effects)
    event_id = await record_deleted(database, uid)
    await run_until(fast_relay(database, [consumer]), published(database, event_id))

    # A relay that crashed before marking the row published delivers it again after a restart.
    async with database.unit_of_work() as session:
        await session.execute(update(OutboxEventRow).where(OutboxEventRow.id == event_id).values(published_at=None))
    await run_until(fast_relay(database, [consumer]), published(database, event_id))

    assert effects == [event_id]


async def test_consumer_failing_twice_succeeds_once(database: Database) -> None:
    uid = new_uid()
    effects: list[str] = []
    relay = fast_relay(database, [counting_consumer(uid, effects, failures=2)])
    event_id = await record_deleted(database, uid)

    await run_until(relay, published(database, event_id))

    row = await load_event(database, event_id)
    assert effects == [event_id]
    assert row.attempts == 2
    async with database.unit_of_work() as session:
        assert await session.get(DeadLetterRow, (f"counter-{uid}", event_id)) is None


async def test_retry_waits_for_backoff(database: Database) -> None:
    uid = new_uid()
    effects: list[str] = []
    now = [100.0]
    relay = EventRelay(
        database,
        [counting_consumer(uid, effects, failures=1)],
        backoff_base_seconds=1.0,
        clock=lambda: now[0],
        jitter=lambda: 0.5,
    )
    event_id = await record_deleted(database, uid)

    await relay.run_once()
    await relay.run_once()
    assert effects == []

    # Full jitter of 0.5 on a first retry bound of 1 second: due 0.5 s after the failure.
    now[0] += 0.5
    await relay.run_once()
    assert effects == [event_id]


async def test_poison_event_is_dead_lettered_then_replayed(database: Database) -> None:
    uid = new_uid()
    effects: list[str] = []
    consumer = counting_consumer(uid, effects, failures=-1)
    relay = fast_relay(database, [consumer], max_attempts=3)
    event_id = await record_deleted(database, uid)

    await run_until(relay, published(database, event_id))

    assert effects == []
    async with database.unit_of_work() as session:
        dead_letter = await session.get(DeadLetterRow, (consumer.name, event_id))
        processed = await session.get(ProcessedEventRow, (consumer.name, event_id))
        listed = await list_dead_letters(session, limit=1000)
    assert dead_letter.attempts == 3
    assert "consumer failed on purpose" in dead_letter.error
    assert processed is None
    assert (consumer.name, event_id, "functions.events.v1.UserDeleted") in [
        (letter.consumer, letter.event_id, letter.event_type) for letter in listed
    ]

    fixed = counting_consumer(uid, effects, name=consumer.name)
    await fast_relay(database, [fixed]).replay_dead_letter(consumer.name, event_id)

    assert effects == [event_id]
    async with database.unit_of_work() as session:
        assert await session.get(DeadLetterRow, (consumer.name, event_id), populate_existing=True) is None
        assert await session.get(ProcessedEventRow, (consumer.name, event_id)) is not None


async def test_failed_replay_keeps_dead_letter(database: Database) -> None:
    uid = new_uid()
    consumer = counting_consumer(uid, [], failures=-1)
    relay = fast_relay(database, [consumer], max_attempts=1)
    event_id = await record_deleted(database, uid)
    await run_until(relay, published(database, event_id))

    with pytest.raises(FailedPrecondition):
        await relay.replay_dead_letter(consumer.name, event_id)

    async with database.unit_of_work() as session:
        dead_letter = await session.get(DeadLetterRow, (consumer.name, event_id), populate_existing=True)
    assert dead_letter.attempts == 2


async def test_replay_of_unknown_dead_letter_is_not_found(database: Database) -> None:
    uid = new_uid()
    relay = fast_relay(database, [counting_consumer(uid, [])])

    with pytest.raises(NotFound):
        await relay.replay_dead_letter(f"counter-{uid}", "00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFound):
        await relay.replay_dead_letter("no-such-consumer", "00000000-0000-0000-0000-000000000000")


async def test_stop_flushes_committed_events(database: Database) -> None:
    uid = new_uid()
    effects: list[str] = []
    relay = EventRelay(database, [counting_consumer(uid, effects)], poll_interval_seconds=60.0)
    relay.start()
    # Let the first pass find nothing of this test, so only the flush can deliver the event.
    await asyncio.sleep(0.05)
    event_id = await record_deleted(database, uid)

    await relay.stop()

    assert effects == [event_id]


async def test_user_created_on_first_get_me(database: Database) -> None:
    principal = Principal(uid=new_uid(), email="first@example.com")

    async with database.unit_of_work() as session:
        await logic.get_or_create_profile(session, principal)
    async with database.unit_of_work() as session:
        await logic.get_or_create_profile(session, principal)

    events = await events_of_type(database, "functions.events.v1.UserCreated", principal.uid, events_pb2.UserCreated)
    assert len(events) == 1


async def test_user_updated_names_changed_fields(database: Database) -> None:
    principal = Principal(uid=new_uid(), email="update@example.com")
    async with database.unit_of_work() as session:
        await logic.get_or_create_profile(session, principal)

    async with database.unit_of_work() as session:
        await logic.update_profile(session, principal, {"display_name": "Grace", "bio": ""}, ["display_name", "bio"])

    events = await events_of_type(database, "functions.events.v1.UserUpdated", principal.uid, events_pb2.UserUpdated)
    assert len(events) == 1
    assert list(events[0].changed_fields.paths) == ["display_name"]
    assert events[0].version == 2


async def events_of_type(database: Database, type_name: str, uid: str, message_type: type) -> list:
    async with database.unit_of_work() as session:
        rows = (await session.execute(select(OutboxEventRow).where(OutboxEventRow.type == type_name))).scalars().all()
    messages = [message_type.FromString(row.payload) for row in rows]
    return [message for message in messages if message.uid == uid]
