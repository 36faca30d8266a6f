"""The pgmq event engine: outbox rows move into per-consumer queues that several workers share.

Postgres only. The module creates its own database, migrates it and loads the pgmq SQL that the
pgmq Python package ships (pgmq 1.13.0 in pgmq==1.1.4), because plain PostgreSQL has no pgmq
extension. Visibility timeouts are 1 second so that retries come back fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from functions.events.v1 import events_pb2
from sqlalchemy import select, text

from app.platform.db import Database, migrate
from app.platform.events import (
    Consumer,
    DeadLetterRow,
    Event,
    OutboxEventRow,
    ProcessedEventRow,
    record_event,
)
from app.platform.pgmq_engine import (
    PgmqEventRelay,
    check_events_engine,
    create_relay,
    queue_name,
)
from tests.databases import (
    POSTGRES_MISSING,
    POSTGRES_URL_VARIABLE,
    create_postgres_database,
    drop_postgres_database,
    load_pgmq_sql,
)
from tests.integration.factories import settings_for

pytestmark = pytest.mark.skipif(not os.environ.get(POSTGRES_URL_VARIABLE), reason=f"pgmq runs on Postgres only: {POSTGRES_MISSING}")

DEADLINE_SECONDS = 15.0
VISIBILITY_TIMEOUT_SECONDS = 1


@pytest.fixture(scope="module")
async def pgmq_url() -> AsyncIterator[str]:
    """Create a migrated Postgres database with pgmq loaded, yield its URL, then drop it."""
    name, url = await create_postgres_database("functions_pgmq")
    try:
        await migrate(settings_for(url))
        await load_pgmq_sql(url)
        yield url
    finally:
        await drop_postgres_database(name)


@pytest.fixture
async def databases(pgmq_url: str) -> AsyncIterator[tuple[Database, Database]]:
    """Two engines on one database, as two processes would open them."""
    first = Database.from_settings(settings_for(pgmq_url))
    second = Database.from_settings(settings_for(pgmq_url))
    yield first, second
    await first.dispose()
    await second.dispose()


def new_uid() -> str:
    return f"pgmq-{secrets.token_hex(6)}"


def counting_consumer(name: str, uid: str, effects: list[str], *, failures: int = 0) -> Consumer:
    """Build a UserDeleted consumer that raises `failures` times for `uid` (forever when negative), then appends the event id to `effects`."""
    remaining = [failures]

    async def handle(event: Event, session) -> None:
        if event.message.uid != uid:
            return
        if remaining[0] != 0:
            remaining[0] -= 1
            raise RuntimeError(f"consumer failed on purpose for {uid}")
        effects.append(event.id)

    return Consumer(name, (events_pb2.UserDeleted,), handle)


def fast_relay(database: Database, consumers: list[Consumer], **options: object) -> PgmqEventRelay:
    return PgmqEventRelay(
        database, consumers, visibility_timeout_seconds=VISIBILITY_TIMEOUT_SECONDS, poll_interval_seconds=0.01, **options
    )


async def record_deleted(database: Database, uid: str) -> str:
    async with database.unit_of_work() as session:
        return await record_event(session, events_pb2.UserDeleted(uid=uid))


async def scalar(database: Database, statement: str, **parameters: object) -> object:
    async with database.unit_of_work() as session:
        return (await session.execute(text(statement), parameters)).scalar_one()


async def run_until(relays: list[PgmqEventRelay], condition: Callable[[], Awaitable[bool]]) -> None:
    """Run passes of every relay concurrently until `condition` returns true, failing after DEADLINE_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while not await condition():
        assert loop.time() < deadline, "the pgmq relays did not reach the expected state in time"
        await asyncio.gather(*(relay.run_once() for relay in relays))
        await asyncio.sleep(0.05)


def test_queue_name_fits_pgmq_limit() -> None:
    name = queue_name("Notifications.Welcome-" + "x" * 120)

    assert len(name) <= 47
    assert name == name.lower()
    assert queue_name("a-b") != queue_name("a_b")


def test_settings_reject_pgmq_on_sqlite(tmp_path: Path) -> None:
    settings = settings_for(f"sqlite+aiosqlite:///{tmp_path / 'functions.db'}", events_engine="pgmq")

    with pytest.raises(ValueError, match="EVENTS_ENGINE=pgmq needs a PostgreSQL DATABASE_URL"):
        check_events_engine(settings)
    with pytest.raises(ValueError, match="EVENTS_ENGINE=pgmq"):
        create_relay(settings, Database.from_settings(settings), [])


async def test_create_relay_picks_engine(pgmq_url: str) -> None:
    database = Database.from_settings(settings_for(pgmq_url, events_engine="pgmq"))
    try:
        relay = create_relay(settings_for(pgmq_url, events_engine="pgmq"), database, [])
        default_relay = create_relay(settings_for(pgmq_url), database, [])
    finally:
        await database.dispose()

    assert isinstance(relay, PgmqEventRelay)
    assert not isinstance(default_relay, PgmqEventRelay)


async def test_two_instances_deliver_once(databases: tuple[Database, Database]) -> None:
    first_database, second_database = databases
    uid = new_uid()
    effects: list[str] = []
    name = f"once-{uid}"
    # Both processes run the same consumer, so they read the same queue.
    first = fast_relay(first_database, [counting_consumer(name, uid, effects)], batch_size=3)
    second = fast_relay(second_database, [counting_consumer(name, uid, effects)], batch_size=3)
    event_ids = [await record_deleted(first_database, uid) for _ in range(12)]

    async def all_handled() -> bool:
        return len(effects) >= len(event_ids)

    await run_until([first, second], all_handled)
    # Passes after the last event must not handle anything a second time.
    for _ in range(3):
        await asyncio.gather(first.run_once(), second.run_once())

    assert sorted(effects) == sorted(event_ids)
    queue = queue_name(name)
    assert await scalar(first_database, "select queue_length from pgmq.metrics(:queue)", queue=queue) == 0
    # Every event was sent to the queue once, so SKIP LOCKED kept the relays apart.
    assert await scalar(first_database, "select total_messages from pgmq.metrics(:queue)", queue=queue) == len(event_ids)
    async with first_database.unit_of_work() as session:
        processed = await session.execute(select(ProcessedEventRow.event_id).where(ProcessedEventRow.consumer == name))
        unpublished = await session.execute(
            select(OutboxEventRow.id).where(OutboxEventRow.id.in_(event_ids), OutboxEventRow.published_at.is_(None))
        )
    assert sorted(processed.scalars()) == sorted(event_ids)
    assert list(unpublished.scalars()) == []


async def test_failed_handler_retries_after_visibility_timeout(databases: tuple[Database, Database]) -> None:
    database, _ = databases
    uid = new_uid()
    effects: list[str] = []
    name = f"retry-{uid}"
    relay = fast_relay(database, [counting_consumer(name, uid, effects, failures=2)], max_attempts=5)
    event_id = await record_deleted(database, uid)

    async def handled() -> bool:
        return bool(effects)

    await run_until([relay], handled)

    assert effects == [event_id]
    async with database.unit_of_work() as session:
        row = await session.get(OutboxEventRow, event_id)
        dead_letter = await session.get(DeadLetterRow, (name, event_id))
    assert row is not None
    assert row.attempts == 2
    assert dead_letter is None
    assert await scalar(database, "select queue_length from pgmq.metrics(:queue)", queue=queue_name(name)) == 0


async def test_poison_event_dead_letters(databases: tuple[Database, Database]) -> None:
    database, _ = databases
    uid = new_uid()
    effects: list[str] = []
    name = f"poison-{uid}"
    relay = fast_relay(database, [counting_consumer(name, uid, effects, failures=-1)], max_attempts=3)
    event_id = await record_deleted(database, uid)

    async def dead_lettered() -> bool:
        async with database.unit_of_work() as session:
            return await session.get(DeadLetterRow, (name, event_id)) is not None

    await run_until([relay], dead_lettered)

    async with database.unit_of_work() as session:
        dead_letter = await session.get(DeadLetterRow, (name, event_id))
    assert dead_letter is not None
    assert dead_letter.attempts == 3
    assert "consumer failed on purpose" in dead_letter.error
    assert effects == []
    queue = queue_name(name)
    assert await scalar(database, "select queue_length from pgmq.metrics(:queue)", queue=queue) == 0
    archived = await scalar(
        database,
        f"select read_ct from pgmq.a_{queue} where message ->> 'event_id' = :event_id",
        event_id=event_id,
    )
    assert archived == 3


async def test_crashed_worker_message_reappears(databases: tuple[Database, Database]) -> None:
    database, other_database = databases
    uid = new_uid()
    effects: list[str] = []
    name = f"crash-{uid}"
    relay = fast_relay(database, [counting_consumer(name, uid, effects)])
    event_id = await record_deleted(database, uid)
    await relay.create_queues()
    await relay.relay_once()
    queue = queue_name(name)
    read = "select msg_id, read_ct, message ->> 'event_id' from pgmq.read(:queue, 1, 100)"

    # A worker reads the message with a 1 s visibility timeout and dies before deleting it.
    async with database.unit_of_work() as session:
        crashed = [tuple(row) for row in await session.execute(text(read), {"queue": queue})]
    crashed = [row for row in crashed if row[2] == event_id]
    async with other_database.unit_of_work() as session:
        hidden = [tuple(row) for row in await session.execute(text(read), {"queue": queue})]
    await asyncio.sleep(VISIBILITY_TIMEOUT_SECONDS + 0.2)
    async with other_database.unit_of_work() as session:
        redelivered = [tuple(row) for row in await session.execute(text(read), {"queue": queue})]

    assert len(crashed) == 1
    assert all(row[2] != event_id for row in hidden)
    assert [(row[0], row[1]) for row in redelivered if row[2] == event_id] == [(crashed[0][0], 2)]

    # The message read above is hidden for 1 s again, after which a live worker handles it.
    other = fast_relay(other_database, [counting_consumer(name, uid, effects)])

    async def handled() -> bool:
        return bool(effects)

    await run_until([other], handled)
    assert effects == [event_id]


async def test_crashes_on_one_event_spare_the_others(databases: tuple[Database, Database]) -> None:
    """A worker killed inside the handler of one event counts a read against that event alone."""
    database, _ = databases
    uid = new_uid()
    effects: list[str] = []
    name = f"spare-{uid}"
    event_ids = [await record_deleted(database, uid) for _ in range(3)]

    async def crash_on_first(event: Event, session) -> None:
        if event.id == event_ids[0]:
            # What a worker killed inside the handler looks like to the relay: the pass never ends.
            raise asyncio.CancelledError
        if event.message.uid == uid:
            effects.append(event.id)

    consumer = Consumer(name, (events_pb2.UserDeleted,), crash_on_first)
    relay = fast_relay(database, [consumer], max_attempts=2)
    await relay.create_queues()
    await relay.relay_once()
    for _ in range(3):
        with contextlib.suppress(asyncio.CancelledError):
            await relay.work_once(consumer)
        await asyncio.sleep(VISIBILITY_TIMEOUT_SECONDS + 0.1)

    async def others_handled() -> bool:
        dead = await scalar(database, "select count(*) from dead_letters where consumer = :name", name=name)
        return len(effects) == 2 and dead == 1

    await run_until([relay], others_handled)
    assert sorted(effects) == sorted(event_ids[1:])
