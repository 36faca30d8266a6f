"""Postgres behind a transaction-mode pooler: PgBouncer on 127.0.0.1 in front of the test database.

A transaction pooler gives each transaction whichever server connection is free, so named
prepared statements leak between clients. These tests show that the service's pooler settings
make 150 concurrent reads succeed, that the same reads fail with the caches left on, and that a
stopped pooler reaches callers as Unavailable with a generic message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from functions.user.v1 import user_pb2
from sqlalchemy.engine import make_url

from app.notifications import logic as notification_logic
from app.notifications.events import NotificationHub
from app.notifications.fanout import start_fanout
from app.platform.context import Principal, principal_var
from app.platform.db import UNAVAILABLE_MESSAGE, Database
from app.platform.errors import Unavailable
from app.users import store
from app.users.handler import UserHandler
from tests.integration.factories import new_profile, settings_for
from tests.servers import free_port

PGBOUNCER = Path("/usr/sbin/pgbouncer")
CONCURRENT_READS = 150
STARTUP_TIMEOUT_SECONDS = 10.0
SEEDED_UID = "pooler-reader"

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not PGBOUNCER.exists(),
        reason=f"{PGBOUNCER} is missing: install the Debian package 'pgbouncer' to run the pooler tests",
    ),
]


@dataclass
class Pooler:
    process: subprocess.Popen
    port: int
    log_path: Path
    config: Path

    def url(self, *, pooler_flag: bool) -> str:
        query = "?pgbouncer=true" if pooler_flag else ""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/functions{query}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)

    def start(self) -> None:
        """Start PgBouncer with this pooler's config and wait until it listens."""
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen([str(PGBOUNCER), str(self.config)], stdout=log_file, stderr=subprocess.STDOUT)
        wait_for_port(self)


def write_config(directory: Path, port: int, server_url: str) -> Path:
    server = make_url(server_url)
    userlist = directory / "userlist.txt"
    userlist.write_text(f'"{server.username or "postgres"}" ""\n')
    lines = [
        "[databases]",
        f"functions = host={server.host or '127.0.0.1'} port={server.port or 5432} "
        f"dbname={server.database} user={server.username or 'postgres'}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {userlist}",
        "pool_mode = transaction",
        "max_client_conn = 1000",
        # Few server connections, so that many client transactions share each one.
        "default_pool_size = 4",
    ]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root, so it switches to an unprivileged user.
        lines.append(f"user = {_unprivileged_user()}")
    config = directory / "pgbouncer.ini"
    config.write_text("\n".join(lines) + "\n")
    return config


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.skip("PgBouncer cannot run as root and neither a 'postgres' nor a 'nobody' user exists")


def wait_for_port(pooler: Pooler) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if pooler.process.poll() is not None:
            pytest.fail(f"pgbouncer exited with {pooler.process.returncode}:\n{pooler.log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", pooler.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pooler.stop()
    pytest.fail(f"pgbouncer did not listen within {STARTUP_TIMEOUT_SECONDS} s:\n{pooler.log_path.read_text()}")


@pytest.fixture
def pooler(postgres_database: Database, postgres_url: str, tmp_path: Path) -> Iterator[Pooler]:
    """Start PgBouncer in transaction mode in front of the session's migrated database."""
    # The unprivileged user PgBouncer switches to must be able to read its files.
    tmp_path.chmod(0o755)
    port = free_port()
    config = write_config(tmp_path, port, postgres_url)
    log_path = tmp_path / "pgbouncer.log"
    log_path.touch()
    running = Pooler(process=None, port=port, log_path=log_path, config=config)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
async def seeded_uid(postgres_database: Database) -> str:
    """Insert, directly into Postgres, the profile the concurrent reads fetch."""
    profile = new_profile(
        SEEDED_UID, "reader@example.com", display_name="Reader", time_zone="UTC", preferences={"theme": "dark"}
    )
    async with postgres_database.unit_of_work() as session:
        await store.add_user(session, profile)
    return SEEDED_UID


def pooler_database(url: str) -> Database:
    settings = settings_for(url, database_pool_size=10, database_max_overflow=10)
    return Database.from_settings(settings)


async def read_concurrently(database: Database, uid: str) -> list[object]:
    """Call GetUser CONCURRENT_READS times at once and return each response or exception."""
    handler = UserHandler(database)
    token = principal_var.set(Principal(uid="admin", roles=("admin",)))
    try:
        calls = [handler.get_user(user_pb2.GetUserRequest(uid=uid), None) for _ in range(CONCURRENT_READS)]
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        principal_var.reset(token)


async def test_concurrent_reads_through_pooler_succeed(pooler: Pooler, seeded_uid: str) -> None:
    database = pooler_database(pooler.url(pooler_flag=True))
    try:
        results = await read_concurrently(database, seeded_uid)
    finally:
        await database.dispose()

    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures == []
    responses = [result for result in results if isinstance(result, user_pb2.GetUserResponse)]
    assert len(responses) == CONCURRENT_READS
    assert all(dict(response.user.preferences) == {"theme": "dark"} for response in responses)


async def test_reads_with_statement_caches_fail_through_pooler(pooler: Pooler, seeded_uid: str) -> None:
    # Without the flag the URL looks direct, so prepared-statement caches stay on.
    database = pooler_database(pooler.url(pooler_flag=False))
    try:
        assert database.uses_pooler is False
        results = await read_concurrently(database, seeded_uid)
    finally:
        await database.dispose()

    failures = [result for result in results if isinstance(result, BaseException)]
    assert len(failures) > 0
    assert all("prepared statement" in str(failure) for failure in failures)


async def test_stopped_pooler_is_unavailable(
    pooler: Pooler, seeded_uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    database = pooler_database(pooler.url(pooler_flag=True))
    handler = UserHandler(database)
    token = principal_var.set(Principal(uid="admin", roles=("admin",)))
    try:
        await handler.get_user(user_pb2.GetUserRequest(uid=seeded_uid), None)
        pooler.stop()
        caplog.set_level(logging.ERROR, logger="app.platform.db")

        with pytest.raises(Unavailable) as caught:
            await handler.get_user(user_pb2.GetUserRequest(uid=seeded_uid), None)
    finally:
        principal_var.reset(token)
        await database.dispose()

    assert caught.value.message == UNAVAILABLE_MESSAGE
    errors = [record for record in caplog.records if record.name == "app.platform.db"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


async def test_concurrent_read_rpcs_through_pooler_succeed(pooler: Pooler, seeded_uid: str, tmp_path: Path) -> None:
    """The same, end to end: a real server whose DATABASE_URL is the pooler, 150 GetMe calls at once."""
    import httpx

    from tests.e2e.conftest import Tokens, server_env
    from tests.servers import run_server
    from tests.support import CertificateServer, certs_document, rsa_key

    key = rsa_key("pooler-e2e")
    tokens = Tokens(key)
    with CertificateServer(certs_document({"e2e-key": key}), max_age=3600) as certificates:
        env = server_env(certificates, pooler.url(pooler_flag=True), DEV_KEYS_DIR=str(tmp_path / "keys"))
        with run_server(env, tmp_path / "server.log") as server:
            headers = [
                {"content-type": "application/json", "authorization": f"Bearer {tokens.mint(f'pooled-{n % 15}')}"}
                for n in range(CONCURRENT_READS)
            ]
            limits = httpx.Limits(max_connections=CONCURRENT_READS)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
                replies = await asyncio.gather(
                    *(client.post("/functions.user.v1.UserService/GetMe", content=b"{}", headers=h) for h in headers)
                )

    assert [reply.status_code for reply in replies] == [200] * CONCURRENT_READS
    assert all(reply.json()["user"]["uid"].startswith("pooled-") for reply in replies)


async def test_database_outage_mid_flow_recovers(pooler: Pooler, tmp_path: Path) -> None:
    """The database disappears between calls (the pooler stops): calls fail with unavailable,
    nothing is half-written, and calls and event delivery resume once it is back."""
    import httpx
    from sqlalchemy import func, select

    from app.platform.events import OutboxEventRow
    from tests.e2e.conftest import Tokens, server_env
    from tests.servers import run_server
    from tests.support import CertificateServer, certs_document, rsa_key

    key = rsa_key("outage-e2e")
    tokens = Tokens(key)
    url = pooler.url(pooler_flag=True)
    headers = lambda uid: {"content-type": "application/json", "authorization": f"Bearer {tokens.mint(uid)}"}  # noqa: E731

    with CertificateServer(certs_document({"e2e-key": key}), max_age=3600) as certificates:
        env = server_env(certificates, url, DEV_KEYS_DIR=str(tmp_path / "keys"), DATABASE_POOL_TIMEOUT_SECONDS="2")
        with run_server(env, tmp_path / "server.log") as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                before = await client.post("/functions.user.v1.UserService/GetMe", content=b"{}", headers=headers("outage-a"))

                pooler.stop()
                started = asyncio.get_running_loop().time()
                during = await client.post("/functions.user.v1.UserService/GetMe", content=b"{}", headers=headers("outage-b"))
                during_seconds = asyncio.get_running_loop().time() - started
                ready_during = await client.get("/readyz")

                pooler.start()
                after = None
                for _ in range(50):
                    after = await client.post("/functions.user.v1.UserService/GetMe", content=b"{}", headers=headers("outage-b"))
                    if after.status_code == 200:
                        break
                    await asyncio.sleep(0.2)

            database = pooler_database(url)
            try:
                for _ in range(50):
                    async with database.unit_of_work() as session:
                        unpublished = (
                            await session.execute(
                                select(func.count()).select_from(OutboxEventRow).where(OutboxEventRow.published_at.is_(None))
                            )
                        ).scalar_one()
                    if unpublished == 0:
                        break
                    await asyncio.sleep(0.2)
                async with database.unit_of_work() as session:
                    created = (
                        await session.execute(select(func.count()).select_from(OutboxEventRow).where(OutboxEventRow.actor_uid == "outage-b"))
                    ).scalar_one()
            finally:
                await database.dispose()

    assert before.status_code == 200
    assert during.status_code == 503
    assert during.json()["code"] == "unavailable"
    assert "SELECT" not in during.text
    assert during_seconds < 10
    assert ready_during.status_code == 503
    assert after.status_code == 200
    assert after.json()["user"]["uid"] == "outage-b"
    # The failed call left no event behind; the successful one recorded exactly one.
    assert created == 1
    assert unpublished == 0


async def test_notifications_through_pooler_fan_out_with_listen_url(pooler: Pooler, postgres_url: str) -> None:
    """Notifications stored through the pooler reach another instance's hub over DATABASE_LISTEN_URL."""
    database = pooler_database(pooler.url(pooler_flag=True))
    sender_hub, receiver_hub = NotificationHub(), NotificationHub()
    fanouts = [await start_fanout(database, hub, listen_url=postgres_url) for hub in (sender_hub, receiver_hub)]
    try:
        subscription = receiver_hub.subscribe("pooled-listener")
        async with database.unit_of_work() as session:
            sent = await notification_logic.send_notification(session, sender_hub, "pooled-listener", "Through the pooler", "")

        received = await asyncio.wait_for(subscription.queue.get(), 5.0)
    finally:
        for fanout in fanouts:
            if fanout is not None:
                await fanout.stop()
        await database.dispose()

    assert received == sent


async def test_pooler_without_listen_url_warns(pooler: Pooler, caplog: pytest.LogCaptureFixture) -> None:
    database = pooler_database(pooler.url(pooler_flag=True))
    try:
        with caplog.at_level(logging.WARNING):
            fanout = await start_fanout(database, NotificationHub())
    finally:
        await database.dispose()

    assert fanout is None
    assert "Set DATABASE_LISTEN_URL" in caplog.text
