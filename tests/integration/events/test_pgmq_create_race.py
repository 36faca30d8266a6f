"""Queue creation while several processes start at once: creators must not fail on each other.

The database gets the pgmq SQL of the pgmq package (pgmq 1.13.0), with its per-queue lock in
`pgmq.acquire_queue_lock` replaced by a no-op. pgmq releases before 1.5.2 have no such lock, and
without it concurrent `pgmq.create` calls of one new queue collide on the catalog. The tests
therefore depend on the relay's own advisory lock alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from functions.events.v1 import events_pb2
from sqlalchemy.engine import make_url

from app.platform.db import Database
from app.platform.events import Consumer, Event
from app.platform.pgmq_engine import QUEUE_CREATION_LOCK_KEY, PgmqEventRelay, queue_name
from tests.databases import (
    POSTGRES_MISSING,
    POSTGRES_URL_VARIABLE,
    create_postgres_database,
    drop_postgres_database,
    load_pgmq_sql,
)
from tests.integration.factories import settings_for

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not os.environ.get(POSTGRES_URL_VARIABLE), reason=f"pgmq runs on Postgres only: {POSTGRES_MISSING}"),
]

CREATORS = 8
ROUNDS = 5
DEADLINE_SECONDS = 10.0
# Behaves like pgmq before 1.5.2, whose pgmq.create took no lock.
DISABLE_PGMQ_QUEUE_LOCK = """
CREATE OR REPLACE FUNCTION pgmq.acquire_queue_lock(queue_name TEXT) RETURNS void AS $$
BEGIN
END;
$$ LANGUAGE plpgsql
"""


@pytest.fixture(scope="module")
async def race_url() -> AsyncIterator[str]:
    """Create a database with pgmq loaded and its per-queue lock disabled, yield its URL, then drop it."""
    name, url = await create_postgres_database("functions_pgmq_race")
    try:
        await load_pgmq_sql(url)
        async with connect(url) as connection:
            await connection.execute(DISABLE_PGMQ_QUEUE_LOCK)
        yield url
    finally:
        await drop_postgres_database(name)


@pytest.fixture
async def databases(race_url: str) -> AsyncIterator[list[Database]]:
    """One engine per creator, as separate processes would open them, each with a connection open already."""
    opened = [Database.from_settings(settings_for(race_url)) for _ in range(CREATORS)]
    try:
        await asyncio.gather(*(database.ping() for database in opened))
        yield opened
    finally:
        for database in opened:
            await database.dispose()


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    """Open one asyncpg connection to a test database for the duration of the block."""
    parsed = make_url(url)
    connection = await asyncpg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
        database=parsed.database,
    )
    try:
        yield connection
    finally:
        await connection.close()


def new_consumer() -> Consumer:
    async def ignore(event: Event, session) -> None:
        return None

    return Consumer(f"race-{secrets.token_hex(6)}", (events_pb2.UserDeleted,), ignore)


async def queue_counts(connection: asyncpg.Connection, queue: str) -> tuple[int, int, int]:
    """Count the pgmq.meta rows, queue tables and archive tables of `queue`."""
    meta = await connection.fetchval("select count(*) from pgmq.meta where queue_name = $1", queue)
    tables = await connection.fetchval(
        "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'pgmq' and c.relkind = 'r' and c.relname = $1",
        f"q_{queue}",
    )
    archives = await connection.fetchval(
        "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'pgmq' and c.relkind = 'r' and c.relname = $1",
        f"a_{queue}",
    )
    return meta, tables, archives


async def wait_for_waiters(connection: asyncpg.Connection, query: str, expected: int, *arguments: object) -> int:
    """Poll `query`, a count of waiting sessions, until it reaches `expected` or DEADLINE_SECONDS pass, and return the last count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    count = await connection.fetchval(query, *arguments)
    while count < expected and loop.time() < deadline:
        await asyncio.sleep(0.02)
        count = await connection.fetchval(query, *arguments)
    return count


async def test_unlocked_create_collides(race_url: str) -> None:
    # Without any lock, a second creator of a queue that another transaction is creating fails:
    # the failure that the relay's lock prevents.
    queue = f"bare_{secrets.token_hex(6)}"
    async with connect(race_url) as first, connect(race_url) as second, connect(race_url) as observer:
        first_transaction = first.transaction()
        await first_transaction.start()
        await first.execute("select pgmq.create($1)", queue)

        async def create_second() -> None:
            async with second.transaction():
                await second.execute("select pgmq.create($1)", queue)

        second_create = asyncio.create_task(create_second())
        second_pid = second.get_server_pid()
        waiting = await wait_for_waiters(observer, "select count(*) from pg_locks where pid = $1 and not granted", 1, second_pid)
        await first_transaction.commit()
        with pytest.raises((asyncpg.UniqueViolationError, asyncpg.DuplicateTableError)):
            await second_create

    assert waiting == 1


async def test_concurrent_creators_all_succeed(race_url: str, databases: list[Database]) -> None:
    for _ in range(ROUNDS):
        consumer = new_consumer()
        relays = [PgmqEventRelay(database, [consumer]) for database in databases]

        results = await asyncio.gather(*(relay.create_queues() for relay in relays), return_exceptions=True)

        failures = [repr(result) for result in results if isinstance(result, BaseException)]
        assert failures == []
        async with connect(race_url) as connection:
            assert await queue_counts(connection, queue_name(consumer.name)) == (1, 1, 1)


async def test_creators_wait_for_creation_in_progress(race_url: str, databases: list[Database]) -> None:
    # A creator holds the lock with the queue created but not committed, the moment at which an
    # unlocked creator would collide. Every relay must wait for it and then succeed.
    consumer = new_consumer()
    queue = queue_name(consumer.name)
    relays = [PgmqEventRelay(database, [consumer]) for database in databases]
    # pg_locks shows a bigint advisory key as its high 32 bits in classid and low 32 bits in objid.
    key = QUEUE_CREATION_LOCK_KEY & 0xFFFF_FFFF_FFFF_FFFF
    waiting_for_lock = (
        "select count(*) from pg_locks where locktype = 'advisory' and not granted"
        " and database = (select oid from pg_database where datname = current_database())"
        " and classid = $1::bigint::oid and objid = $2::bigint::oid and objsubid = 1"
    )

    async with connect(race_url) as holder, connect(race_url) as observer:
        holder_transaction = holder.transaction()
        await holder_transaction.start()
        await holder.execute("select pg_advisory_xact_lock($1)", QUEUE_CREATION_LOCK_KEY)
        await holder.execute("select pgmq.create($1)", queue)
        creations = [asyncio.create_task(relay.create_queues()) for relay in relays]
        try:
            waiting = await wait_for_waiters(observer, waiting_for_lock, CREATORS, key >> 32, key & 0xFFFF_FFFF)
            finished_early = [task for task in creations if task.done()]
        finally:
            await holder_transaction.commit()
        results = await asyncio.gather(*creations, return_exceptions=True)
        counts = await queue_counts(observer, queue)

    assert waiting == CREATORS
    assert finished_early == []
    assert [repr(result) for result in results if isinstance(result, BaseException)] == []
    assert counts == (1, 1, 1)
