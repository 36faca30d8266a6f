"""Postgres itself stops mid-flow and comes back, under a real server with the in-process relay.

The server runs on a private PostgreSQL cluster (tests/support/private_postgres.py), because the
machine's shared Postgres serves other tests. GetMe calls for new users keep arriving while the
cluster stops with `pg_ctl stop -m immediate`, which ends every backend at once as a crash would.
Calls must then fail fast with `unavailable` and a generic message, /readyz must report 503 while
/healthz stays 200, and no user may exist without its UserCreated event. After the cluster starts
again on the same port and data directory, the same server process must serve calls, and its
relay must deliver every welcome notification exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from functions.events.v1 import events_pb2
from sqlalchemy import func, select

from app.notifications.events import WELCOME_TITLE
from app.notifications.model import NotificationRow
from app.platform.db import UNAVAILABLE_MESSAGE, Database
from app.platform.events import DeadLetterRow, OutboxEventRow
from app.settings import Settings
from app.users.model import UserRow
from tests.e2e.conftest import Tokens, server_env
from tests.servers import RunningServer, run_migrations, run_server
from tests.support.private_postgres import PrivatePostgres, private_postgres

pytestmark = pytest.mark.postgres

GET_ME = "/functions.user.v1.UserService/GetMe"
USER_CREATED = events_pb2.UserCreated.DESCRIPTOR.full_name
# Each call carries this deadline, and the HTTP client gives up after it: a call that hangs
# shows up as a timeout instead of blocking the test.
CALL_TIMEOUT_SECONDS = 5.0
# Upper bound of each polling loop: welcome delivery, recovery after the restart, the burst.
WAIT_SECONDS = 15.0
POLL_SECONDS = 0.1
USERS_BEFORE = 5
USERS_AFTER = 5
BURST_WORKERS = 8
# Successful burst calls to see before the stop, so that the stop lands while calls flow.
BURST_SUCCESSES_BEFORE_STOP = 2 * BURST_WORKERS
# Failed calls each burst worker receives after the stop before it ends.
BURST_FAILURES_PER_WORKER = 2
# Words of SQL, driver and traceback text that must never reach a client.
LEAKED_WORDS = ("SELECT", "INSERT", "asyncpg", "sqlalchemy", "Traceback", "postgres", "connection")


@dataclass(frozen=True)
class Outcome:
    """One GetMe call: the new user's uid, the HTTP status (None on a client timeout), the body and duration."""

    uid: str
    status: int | None
    body: dict
    text: str
    seconds: float


async def get_me(client: httpx.AsyncClient, tokens: Tokens, uid: str) -> Outcome:
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {tokens.mint(uid)}",
        "connect-timeout-ms": str(int(CALL_TIMEOUT_SECONDS * 1000)),
    }
    started = time.monotonic()
    try:
        reply = await client.post(GET_ME, content=b"{}", headers=headers)
    except httpx.TimeoutException:
        return Outcome(uid, None, {}, "", time.monotonic() - started)
    return Outcome(uid, reply.status_code, reply.json(), reply.text, time.monotonic() - started)


async def create_users(client: httpx.AsyncClient, tokens: Tokens, prefix: str, count: int) -> list[Outcome]:
    return list(await asyncio.gather(*(get_me(client, tokens, f"{prefix}-{n}") for n in range(count))))


async def burst_through_outage(client: httpx.AsyncClient, tokens: Tokens, cluster: PrivatePostgres) -> list[Outcome]:
    """Keep BURST_WORKERS GetMe calls for new users in flight, stop Postgres among them, and return every outcome."""
    outcomes: list[Outcome] = []
    numbers = itertools.count()
    stopped = asyncio.Event()
    deadline = time.monotonic() + WAIT_SECONDS

    async def call_until_failures() -> None:
        failures = 0
        while failures < BURST_FAILURES_PER_WORKER and time.monotonic() < deadline:
            outcome = await get_me(client, tokens, f"burst-{next(numbers)}")
            outcomes.append(outcome)
            if stopped.is_set() and outcome.status != 200:
                failures += 1

    workers = [asyncio.create_task(call_until_failures()) for _ in range(BURST_WORKERS)]
    while sum(outcome.status == 200 for outcome in outcomes) < BURST_SUCCESSES_BEFORE_STOP and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    try:
        # In a thread, so that the workers keep calling while pg_ctl stops the server.
        await asyncio.to_thread(cluster.stop, "immediate")
    finally:
        stopped.set()
        await asyncio.gather(*workers)
    return outcomes


async def wait_for_recovery(client: httpx.AsyncClient, tokens: Tokens) -> Outcome:
    """Call GetMe for a new user until it succeeds or WAIT_SECONDS pass, and return the last outcome."""
    deadline = time.monotonic() + WAIT_SECONDS
    for attempt in itertools.count():
        outcome = await get_me(client, tokens, f"recovered-{attempt}")
        if outcome.status == 200 or time.monotonic() > deadline:
            return outcome
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Stored:
    """The database contents after the test: uids per table, unpublished events and dead letters."""

    users: Counter[str]
    created_events: Counter[str]
    welcomes: Counter[str]
    unpublished: int
    dead_letters: int


async def read_stored(url: str) -> Stored:
    users_query = select(UserRow.uid)
    created_query = select(OutboxEventRow.payload).where(OutboxEventRow.type == USER_CREATED)
    welcomes_query = select(NotificationRow.uid).where(NotificationRow.title == WELCOME_TITLE)
    unpublished_query = select(func.count()).select_from(OutboxEventRow).where(OutboxEventRow.published_at.is_(None))
    dead_letters_query = select(func.count()).select_from(DeadLetterRow)

    database = Database.from_settings(Settings(app_env="test", database_url=url))
    try:
        async with database.unit_of_work() as session:
            users = Counter((await session.execute(users_query)).scalars())
            payloads = (await session.execute(created_query)).scalars()
            created_events = Counter(events_pb2.UserCreated.FromString(payload).uid for payload in payloads)
            welcomes = Counter((await session.execute(welcomes_query)).scalars())
            unpublished = (await session.execute(unpublished_query)).scalar_one()
            dead_letters = (await session.execute(dead_letters_query)).scalar_one()
    finally:
        await database.dispose()
    return Stored(users, created_events, welcomes, unpublished, dead_letters)


async def wait_for_delivery(url: str, uids: list[str]) -> Stored:
    """Read the database until every event is published and each uid has a welcome, or WAIT_SECONDS pass."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        stored = await read_stored(url)
        delivered = stored.unpublished == 0 and all(stored.welcomes[uid] for uid in uids)
        if delivered or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(POLL_SECONDS)


def server_log_tail(server: RunningServer) -> str:
    return server.log()[-4000:]


async def test_postgres_outage_mid_flow_recovers(tmp_path: Path, cert_server, tokens: Tokens) -> None:
    with private_postgres() as cluster:
        url = cluster.create_database("functions")
        env = server_env(
            cert_server, url, DEV_KEYS_DIR=str(tmp_path / "keys"), ENABLED_SERVICES="auth,users,notifications",
            DATABASE_POOL_TIMEOUT_SECONDS="2",
        )
        run_migrations(env)

        with run_server(env, tmp_path / "server.log") as server:
            timeout = httpx.Timeout(CALL_TIMEOUT_SECONDS)
            limits = httpx.Limits(max_connections=BURST_WORKERS + 2)
            async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
                before = await create_users(client, tokens, "before", USERS_BEFORE)
                before_uids = [outcome.uid for outcome in before]
                stored_before = await wait_for_delivery(url, before_uids)

                burst = await burst_through_outage(client, tokens, cluster)
                ready_during = await client.get("/readyz")
                health_during = await client.get("/healthz")
                down_call = await get_me(client, tokens, "during-outage")

                await asyncio.to_thread(cluster.start)
                recovered = await wait_for_recovery(client, tokens)
                after = await create_users(client, tokens, "after", USERS_AFTER)

            server_pid_alive = server.process.poll() is None
            after_uids = [outcome.uid for outcome in after]
            stored = await wait_for_delivery(url, before_uids + after_uids)
            log_tail = server_log_tail(server)

    # 1. Before the outage, calls succeed and the relay delivers each new user's welcome.
    assert [outcome.status for outcome in before] == [200] * USERS_BEFORE, log_tail
    assert all(stored_before.welcomes[uid] == 1 for uid in before_uids), stored_before.welcomes

    # 2. Postgres stopped while calls were flowing: some calls succeeded first, later ones failed.
    succeeded = [outcome for outcome in burst if outcome.status == 200]
    failed = [outcome for outcome in burst if outcome.status != 200]
    assert len(succeeded) >= BURST_SUCCESSES_BEFORE_STOP, log_tail
    assert len(failed) >= BURST_WORKERS * BURST_FAILURES_PER_WORKER, log_tail
    # Every failure is a fast, generic `unavailable`: no timeout, no internal error, no leaked text.
    assert {outcome.status for outcome in failed} == {503}, [(o.status, o.text) for o in failed]
    assert {outcome.body.get("code") for outcome in failed} == {"unavailable"}
    assert {outcome.body.get("message") for outcome in failed} == {UNAVAILABLE_MESSAGE}
    leaks = [(word, outcome.text) for outcome in failed for word in LEAKED_WORDS if word.lower() in outcome.text.lower()]
    assert leaks == []
    assert max(outcome.seconds for outcome in failed) < CALL_TIMEOUT_SECONDS
    assert down_call.status == 503
    assert down_call.body.get("code") == "unavailable"

    # 3. While Postgres is down, the process is alive but not ready.
    assert ready_during.status_code == 503
    assert ready_during.json()["status"] == "unavailable"
    assert health_during.status_code == 200

    # 4. After the restart, the same server process serves calls again.
    assert server_pid_alive
    assert recovered.status == 200, (recovered.status, recovered.text, log_tail)
    assert [outcome.status for outcome in after] == [200] * USERS_AFTER, log_tail

    # Nothing half-written: each user row has exactly one UserCreated event and the reverse,
    # including users whose call failed after their transaction committed.
    succeeded_uids = [outcome.uid for outcome in [*before, *succeeded, recovered, *after]]
    assert [uid for uid in succeeded_uids if stored.users[uid] != 1] == []
    assert set(stored.users) == set(stored.created_events)
    assert [uid for uid, count in stored.created_events.items() if count != 1] == []
    failed_with_user = [outcome.uid for outcome in failed if outcome.uid in stored.users]
    assert all(stored.created_events[uid] == 1 for uid in failed_with_user)

    # The relay resumed: every event is published, and every created user got exactly one welcome.
    assert stored.unpublished == 0, log_tail
    assert stored.dead_letters == 0, log_tail
    assert [uid for uid in before_uids + after_uids if stored.welcomes[uid] != 1] == []
    assert stored.welcomes == stored.created_events
