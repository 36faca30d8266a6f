"""Call deadlines: the default deadline, the contextvar that carries it, and SQL bounded by it.

The Postgres tests run the health service's Check through connectrpc with a readiness check that
sleeps in SQL, so the path is the production one: interceptors, unit of work, statement timeout.
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from sqlalchemy import text

from app.platform.codecs import server_codecs
from app.platform.db import Database
from app.platform.deadlines import (
    DeadlineInterceptor,
    deadline_var,
    remaining_seconds,
    statement_timeout_ms,
)
from app.platform.health import HealthASGIApplication, HealthService
from app.platform.interceptors import service_interceptors
from app.settings import Settings
from tests.databases import (
    POSTGRES_MISSING,
    POSTGRES_URL_VARIABLE,
    create_postgres_database,
    drop_postgres_database,
)


class FakeContext:
    """The part of connectrpc's RequestContext that the interceptor reads."""

    def __init__(self, timeout_ms: float | None) -> None:
        self.timeout_ms = timeout_ms


async def test_default_deadline_ends_slow_call() -> None:
    interceptor = DeadlineInterceptor(default_seconds=0.05)

    async def sleep_forever(request, ctx):
        await asyncio.sleep(10)

    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        await interceptor.intercept_unary(sleep_forever, None, FakeContext(None))

    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0


async def test_client_deadline_replaces_default() -> None:
    interceptor = DeadlineInterceptor(default_seconds=30)
    seen: list[float | None] = []

    async def record_remaining(request, ctx):
        seen.append(remaining_seconds())

    await interceptor.intercept_unary(record_remaining, None, FakeContext(200))

    assert seen[0] is not None
    assert 0.1 < seen[0] <= 0.2


async def test_default_deadline_reaches_handler() -> None:
    interceptor = DeadlineInterceptor(default_seconds=30)
    seen: list[float | None] = []

    async def record_remaining(request, ctx):
        seen.append(remaining_seconds())

    await interceptor.intercept_unary(record_remaining, None, FakeContext(None))

    assert seen[0] is not None
    assert 29 < seen[0] <= 30


async def test_deadline_is_cleared_after_call() -> None:
    interceptor = DeadlineInterceptor(default_seconds=30)

    async def reply(request, ctx):
        return "ok"

    result = await interceptor.intercept_unary(reply, None, FakeContext(None))

    assert result == "ok"
    assert deadline_var.get() is None


async def test_failure_after_deadline_is_deadline_exceeded() -> None:
    interceptor = DeadlineInterceptor(default_seconds=30)

    async def fail_late(request, ctx):
        # Blocks past the deadline without awaiting, so the asyncio timer cannot fire first, then
        # fails as the unit of work does when Postgres cancels a statement for its statement_timeout.
        time.sleep(0.05)
        raise ConnectError(Code.UNAVAILABLE, "database unavailable; retry later")

    with pytest.raises(ConnectError) as caught:
        await interceptor.intercept_unary(fail_late, None, FakeContext(20))

    assert caught.value.code == Code.DEADLINE_EXCEEDED


async def test_failure_before_deadline_keeps_its_code() -> None:
    interceptor = DeadlineInterceptor(default_seconds=30)

    async def fail(request, ctx):
        raise ConnectError(Code.NOT_FOUND, "user alice not found")

    with pytest.raises(ConnectError) as caught:
        await interceptor.intercept_unary(fail, None, FakeContext(None))

    assert caught.value.code == Code.NOT_FOUND


async def test_handler_timeout_error_is_not_deadline() -> None:
    interceptor = DeadlineInterceptor(default_seconds=30)

    async def time_out_inside(request, ctx):
        raise TimeoutError("certificate fetch timed out")

    with pytest.raises(TimeoutError):
        await interceptor.intercept_unary(time_out_inside, None, FakeContext(None))


async def test_client_stream_gets_default_deadline() -> None:
    interceptor = DeadlineInterceptor(default_seconds=0.05)

    async def sleep_forever(request, ctx):
        await asyncio.sleep(10)

    with pytest.raises(ConnectError) as caught:
        await interceptor.intercept_client_stream(sleep_forever, None, FakeContext(None))

    assert caught.value.code == Code.DEADLINE_EXCEEDED


def test_statement_timeout_without_deadline_is_none() -> None:
    assert statement_timeout_ms() is None


def test_statement_timeout_is_remaining_milliseconds() -> None:
    token = deadline_var.set(time.monotonic() + 1.5)
    try:
        timeout_ms = statement_timeout_ms()
    finally:
        deadline_var.reset(token)

    assert timeout_ms is not None
    assert 1400 < timeout_ms <= 1500


def test_statement_timeout_after_deadline_is_one_millisecond() -> None:
    token = deadline_var.set(time.monotonic() - 5)
    try:
        timeout_ms = statement_timeout_ms()
    finally:
        deadline_var.reset(token)

    assert timeout_ms == 1


def test_default_must_be_positive() -> None:
    with pytest.raises(ValueError, match="default_seconds must be positive"):
        DeadlineInterceptor(default_seconds=0)


postgres = pytest.mark.skipif(not os.environ.get(POSTGRES_URL_VARIABLE), reason=POSTGRES_MISSING)
SLEEP_SQL = "SELECT pg_sleep(5)"


@pytest.fixture
async def postgres_database():
    name, url = await create_postgres_database("functions_deadlines")
    database = Database.from_settings(Settings(database_url=url))
    try:
        async with database.unit_of_work() as session:
            await session.execute(text("CREATE TABLE marks (note text NOT NULL)"))
        yield database
    finally:
        await database.dispose()
        await drop_postgres_database(name)


def health_client(database: Database, *, default_deadline_seconds: float = 30) -> httpx.AsyncClient:
    """Serve Health/Check whose readiness check writes a row, then sleeps 5 s in SQL."""

    async def write_then_sleep() -> bool:
        async with database.unit_of_work() as session:
            await session.execute(text("INSERT INTO marks (note) VALUES ('half-written')"))
            await session.execute(text(SLEEP_SQL))
        return True

    health = HealthService([], write_then_sleep)
    app = HealthASGIApplication(
        health, interceptors=service_interceptors(default_deadline_seconds), codecs=server_codecs()
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def call_check(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post(
        "/grpc.health.v1.Health/Check",
        content=b"{}",
        headers={"content-type": "application/json", **(headers or {})},
    )


async def sleeping_statements(database: Database) -> int:
    """Count the server's backends still running the sleep, waiting up to 1 s for cancellation to land."""
    count = -1
    for _ in range(20):
        async with database.engine.connect() as connection:
            result = await connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE state = 'active' AND query = :query AND pid <> pg_backend_pid()"
                ),
                {"query": SLEEP_SQL},
            )
            count = result.scalar_one()
        if count == 0:
            return 0
        await asyncio.sleep(0.05)
    return count


async def count_marks(database: Database) -> int:
    async with database.engine.connect() as connection:
        return (await connection.execute(text("SELECT count(*) FROM marks"))).scalar_one()


@postgres
async def test_client_deadline_cancels_sql(postgres_database) -> None:
    async with health_client(postgres_database) as client:
        started = time.monotonic()
        response = await call_check(client, {"connect-timeout-ms": "200"})
        elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.json()["code"] == "deadline_exceeded"
    assert elapsed < 1.5
    assert await sleeping_statements(postgres_database) == 0
    assert await count_marks(postgres_database) == 0


@postgres
async def test_default_deadline_cancels_sql(postgres_database) -> None:
    async with health_client(postgres_database, default_deadline_seconds=0.2) as client:
        started = time.monotonic()
        response = await call_check(client)
        elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.json()["code"] == "deadline_exceeded"
    assert elapsed < 1.5
    assert await sleeping_statements(postgres_database) == 0
    assert await count_marks(postgres_database) == 0


@postgres
async def test_statement_timeout_is_set_in_transaction(postgres_database) -> None:
    token = deadline_var.set(time.monotonic() + 2.0)
    try:
        async with postgres_database.unit_of_work() as session:
            inside = (await session.execute(text("SHOW statement_timeout"))).scalar_one()
    finally:
        deadline_var.reset(token)
    async with postgres_database.unit_of_work() as session:
        outside = (await session.execute(text("SHOW statement_timeout"))).scalar_one()

    assert inside.endswith("ms") or inside.endswith("s")
    assert inside != "0"
    assert outside == "0"


@postgres
async def test_statement_timeout_alone_stops_sql(postgres_database) -> None:
    # Without the asyncio timer, as when the event loop is blocked: the server still stops the statement.
    token = deadline_var.set(time.monotonic() + 0.2)
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as caught:
            async with postgres_database.unit_of_work() as session:
                await session.execute(text(SLEEP_SQL))
    finally:
        deadline_var.reset(token)

    assert time.monotonic() - started < 1.5
    assert "canceling statement due to statement timeout" in str(caught.value.__cause__)
