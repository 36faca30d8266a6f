"""Two `python -m app worker` processes share the pgmq queues of the events a web process records.

One web process (EVENTS_RELAY_IN_WEB=false) and two workers run with EVENTS_ENGINE=pgmq on one
Postgres database that has the pgmq SQL of the pgmq package loaded. Each first signed-in GetMe
creates a user and a UserCreated event, and the welcome consumer of the workers turns that event
into one welcome notification.

To catch the workers while they hold messages, the test locks the notifications table, so each
worker stops inside the welcome handler with a message read. One worker is then killed with
SIGKILL. The workers read with a visibility timeout of VISIBILITY_TIMEOUT_SECONDS, after which
the survivor takes the killed worker's message.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from functions.events.v1 import events_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.notifications.events import (
    USER_DELETED_CONSUMER_NAME,
    WELCOME_CONSUMER_NAME,
    WELCOME_TITLE,
)
from app.platform.db import Database
from app.platform.pgmq_engine import queue_name
from app.settings import Settings
from tests.databases import (
    POSTGRES_MISSING,
    POSTGRES_URL_VARIABLE,
    create_postgres_database,
    drop_postgres_database,
    load_pgmq_sql,
)
from tests.e2e.conftest import Tokens, server_env
from tests.servers import ROOT, RunningServer, run_migrations, run_server

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not os.environ.get(POSTGRES_URL_VARIABLE), reason=f"pgmq runs on Postgres only: {POSTGRES_MISSING}"),
]

DEADLINE_SECONDS = 15.0
# Short, so the killed worker's message comes back to the survivor within the test.
VISIBILITY_TIMEOUT_SECONDS = 8
POLL_SECONDS = 0.05
FIRST_USERS = 12
WELCOME_QUEUE = queue_name(WELCOME_CONSUMER_NAME)
USER_DELETED_QUEUE = queue_name(USER_DELETED_CONSUMER_NAME)
USER_CREATED = events_pb2.UserCreated.DESCRIPTOR.full_name
GET_ME = "functions.user.v1.UserService/GetMe"
LIST_NOTIFICATIONS = "functions.notification.v1.NotificationService/ListNotifications"


@dataclass
class Worker:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Send SIGTERM to the worker, wait for it to exit and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
async def pgmq_url() -> AsyncIterator[str]:
    """Create a Postgres database for this test, yield its URL, then drop it."""
    name, url = await create_postgres_database("functions_pgmq_workers")
    try:
        yield url
    finally:
        await drop_postgres_database(name)


def start_worker(env: dict[str, str], log_path: Path) -> Worker:
    """Start `python -m app worker` with its output in `log_path`."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "worker"],
            env={**os.environ, "APP_ENV": "test", "LOG_LEVEL": "INFO", **env},
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Worker(process, log_path)


async def create_user(client: httpx.AsyncClient, server: RunningServer, tokens: Tokens, uid: str) -> None:
    """Call GetMe as `uid` for the first time, which creates the user and records UserCreated."""
    reply = await client.post(
        f"{server.url}/{GET_ME}", json={}, headers={"authorization": f"Bearer {tokens.mint(uid)}"}
    )
    assert reply.status_code == 200, reply.text


async def welcome_titles(client: httpx.AsyncClient, server: RunningServer, tokens: Tokens, uid: str) -> list[str]:
    """List the titles of `uid`'s welcome notifications through NotificationService."""
    reply = await client.post(
        f"{server.url}/{LIST_NOTIFICATIONS}", json={}, headers={"authorization": f"Bearer {tokens.mint(uid)}"}
    )
    assert reply.status_code == 200, reply.text
    return [item["title"] for item in reply.json().get("notifications", []) if item["title"] == WELCOME_TITLE]


async def rows(database: Database, statement: str, **parameters: object) -> list:
    async with database.unit_of_work() as session:
        return list(await session.execute(text(statement), parameters))


async def scalar(database: Database, statement: str, **parameters: object) -> object:
    async with database.unit_of_work() as session:
        return (await session.execute(text(statement), parameters)).scalar_one()


async def welcome_counts(database: Database) -> dict[str, int]:
    """Count the welcome notifications of each uid."""
    found = await rows(
        database, "select uid, count(*) from notifications where title = :title group by uid", title=WELCOME_TITLE
    )
    return {uid: count for uid, count in found}


async def created_event_ids(database: Database) -> dict[str, str]:
    """Map each uid to the id of its UserCreated event."""
    found = await rows(database, "select id, payload from outbox_events where type = :type", type=USER_CREATED)
    return {events_pb2.UserCreated.FromString(payload).uid: event_id for event_id, payload in found}


async def processed_event_ids(database: Database, consumer: str) -> list[str]:
    found = await rows(database, "select event_id from processed_events where consumer = :consumer", consumer=consumer)
    return [event_id for (event_id,) in found]


async def queue_metrics(database: Database, queue: str) -> tuple[int, int]:
    """Return the messages in `queue` now and the messages ever sent to it."""
    found = await rows(database, "select queue_length, total_messages from pgmq.metrics(:queue)", queue=queue)
    return found[0][0], found[0][1]


async def unpublished_count(database: Database) -> int:
    return await scalar(database, "select count(*) from outbox_events where published_at is null")


async def blocked_handler_count(database: Database) -> int:
    """Count the sessions of the test database that wait for a lock on the notifications table."""
    return await scalar(
        database,
        "select count(distinct pid) from pg_locks where not granted and relation = 'notifications'::regclass"
        " and database = (select oid from pg_database where datname = current_database())",
    )


async def wait_until(condition: Callable[[], Awaitable[bool]], description: str, workers: list[Worker]) -> None:
    """Poll `condition` until it returns true, or fail with `description` and the worker logs after DEADLINE_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while not await condition():
        if loop.time() > deadline:
            logs = "\n".join(f"--- {worker.log_path.name}\n{worker.log()[-3000:]}" for worker in workers)
            raise AssertionError(f"timed out after {DEADLINE_SECONDS} s waiting until {description}\n{logs}")
        await asyncio.sleep(POLL_SECONDS)


async def test_pgmq_workers_share_and_recover(pgmq_url: str, tmp_path: Path, cert_server, tokens: Tokens) -> None:
    env = server_env(
        cert_server,
        pgmq_url,
        DEV_KEYS_DIR=str(tmp_path / "keys"),
        ENABLED_SERVICES="auth,users,notifications",
        EVENTS_ENGINE="pgmq",
        EVENTS_RELAY_IN_WEB="false",
        EVENTS_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY_TIMEOUT_SECONDS),
    )
    run_migrations(env)
    await load_pgmq_sql(pgmq_url)
    database = Database.from_settings(Settings(app_env="test", database_url=pgmq_url))
    run_id = secrets.token_hex(4)
    first_uids = [f"pgmq-{run_id}-{index}" for index in range(FIRST_USERS)]
    held_uids = [f"pgmq-{run_id}-held-{index}" for index in range(2)]
    later_uids = [f"pgmq-{run_id}-later-{index}" for index in range(2)]
    workers: list[Worker] = []
    blocker: AsyncConnection | None = None

    try:
        with run_server(env, tmp_path / "server.log") as server:
            workers = [start_worker(env, tmp_path / f"worker-{index}.log") for index in range(2)]
            async with httpx.AsyncClient(timeout=30) as client:
                # Two workers compete for the welcome events of many users created at once.
                await asyncio.gather(*(create_user(client, server, tokens, uid) for uid in first_uids))

                async def first_users_welcomed() -> bool:
                    counts = await welcome_counts(database)
                    return (
                        all(uid in counts for uid in first_uids)
                        and await unpublished_count(database) == 0
                        and (await queue_metrics(database, WELCOME_QUEUE))[0] == 0
                    )

                await wait_until(first_users_welcomed, "every first user has a welcome notification", workers)
                counts = await welcome_counts(database)
                assert [counts[uid] for uid in first_uids] == [1] * FIRST_USERS

                # With the notifications table locked, a worker that reads a welcome message stops
                # inside the handler. It handles one message at a time, so two stopped handlers
                # mean that each worker has read one message and not finished it.
                blocker = await database.engine.connect()
                await blocker.execute(text("lock table notifications in share row exclusive mode"))
                await create_user(client, server, tokens, held_uids[0])

                async def one_handler_blocked() -> bool:
                    return await blocked_handler_count(database) == 1

                await wait_until(one_handler_blocked, "a worker holds the first message", workers)
                await create_user(client, server, tokens, held_uids[1])

                async def two_handlers_blocked() -> bool:
                    return await blocked_handler_count(database) == 2

                await wait_until(two_handlers_blocked, "both workers hold a message", workers)
                held_messages = await rows(
                    database,
                    f"select read_ct, vt > clock_timestamp() from pgmq.q_{WELCOME_QUEUE}",
                )
                assert sorted(tuple(row) for row in held_messages) == [(1, True), (1, True)]

                killed, survivor = workers
                killed.process.send_signal(signal.SIGKILL)
                killed.process.wait(15)
                await blocker.rollback()
                await blocker.close()
                blocker = None
                for uid in later_uids:
                    await create_user(client, server, tokens, uid)

                # The survivor finishes its own message and the later users, while the killed
                # worker's message stays hidden until its visibility timeout ends.
                async def all_but_killed_message_handled() -> bool:
                    counts = await welcome_counts(database)
                    welcomed = [uid for uid in [*held_uids, *later_uids] if uid in counts]
                    return (
                        len(welcomed) == 3
                        and await unpublished_count(database) == 0
                        and (await queue_metrics(database, WELCOME_QUEUE))[0] == 1
                    )

                await wait_until(all_but_killed_message_handled, "only the killed worker's message is left", workers)
                remaining = await rows(
                    database,
                    f"select msg_id, read_ct, vt > clock_timestamp(), message ->> 'event_id' from pgmq.q_{WELCOME_QUEUE}",
                )
                assert len(remaining) == 1
                remaining_msg_id, remaining_read_count, remaining_hidden, remaining_event_id = remaining[0]
                event_ids = await created_event_ids(database)
                remaining_uid = next(uid for uid, event_id in event_ids.items() if event_id == remaining_event_id)
                assert remaining_uid in held_uids
                assert remaining_read_count == 1
                assert remaining_hidden
                assert remaining_uid not in await welcome_counts(database)
                assert remaining_event_id not in await processed_event_ids(database, WELCOME_CONSUMER_NAME)

                async def killed_message_handled() -> bool:
                    return remaining_uid in await welcome_counts(database) and (await queue_metrics(database, WELCOME_QUEUE))[0] == 0

                await wait_until(killed_message_handled, "the survivor handles the killed worker's message", workers)

                all_uids = [*first_uids, *held_uids, *later_uids]
                titles = {uid: await welcome_titles(client, server, tokens, uid) for uid in all_uids}

            counts = await welcome_counts(database)
            event_ids = await created_event_ids(database)
            processed = await processed_event_ids(database, WELCOME_CONSUMER_NAME)
            welcome_metrics = await queue_metrics(database, WELCOME_QUEUE)
            user_deleted_metrics = await queue_metrics(database, USER_DELETED_QUEUE)
            dead_letters = await scalar(database, "select count(*) from dead_letters")
            failed_attempts = await scalar(database, "select coalesce(sum(attempts), 0) from outbox_events")
            survivor_running = survivor.process.poll() is None
            survivor_exit_code = survivor.stop()
    finally:
        if blocker is not None:
            await blocker.rollback()
            await blocker.close()
        for worker in workers:
            worker.stop()
        await database.dispose()

    assert titles == {uid: [WELCOME_TITLE] for uid in all_uids}
    assert counts == {uid: 1 for uid in all_uids}
    assert sorted(event_ids) == sorted(all_uids)
    assert sorted(processed) == sorted(event_ids.values())
    # Each event went to the welcome queue once although both workers relay.
    assert welcome_metrics == (0, len(all_uids))
    assert user_deleted_metrics == (0, 0)
    assert dead_letters == 0
    assert failed_attempts == 0
    assert killed.process.returncode == -signal.SIGKILL
    assert survivor_running
    assert survivor_exit_code == 0, survivor.log()
    # The killed worker died before committing, so the survivor created the notification it held.
    assert re.search(rf"notification created .*uid={re.escape(remaining_uid)}\b", survivor.log())
    for worker in workers:
        assert "event relay pass failed" not in worker.log()
