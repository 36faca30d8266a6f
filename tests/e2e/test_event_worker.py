"""A separate `python -m app worker` relays the events that web processes commit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import select

from app.platform.db import Database
from app.platform.events import OutboxEventRow
from app.settings import Settings
from tests.e2e.conftest import server_env
from tests.servers import ROOT, run_migrations, run_server


async def outbox_rows(url: str) -> list[OutboxEventRow]:
    database = Database.from_settings(Settings(app_env="test", database_url=url))
    try:
        async with database.unit_of_work() as session:
            return list((await session.execute(select(OutboxEventRow))).scalars())
    finally:
        await database.dispose()


def wait_for_rows(url: str, done, timeout: float = 10.0) -> list[OutboxEventRow]:
    deadline = time.monotonic() + timeout
    rows = asyncio.run(outbox_rows(url))
    while not done(rows) and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = asyncio.run(outbox_rows(url))
    return rows


def test_worker_relays_events_of_web_process(tmp_path: Path, cert_server, tokens) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'worker.db'}"
    env = server_env(cert_server, url, DEV_KEYS_DIR=str(tmp_path / "keys"), EVENTS_RELAY_IN_WEB="false")
    run_migrations(env)

    with run_server(env, tmp_path / "server.log") as server:
        reply = httpx.post(
            f"{server.url}/functions.user.v1.UserService/GetMe", content=b"{}",
            headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint('worker-user')}"},
        )
        time.sleep(1.5)
        unrelayed = asyncio.run(outbox_rows(url))

        with (tmp_path / "worker.log").open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "app", "worker"], env={**os.environ, **env}, cwd=ROOT,
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            relayed = wait_for_rows(url, lambda rows: rows and all(row.published_at for row in rows))
        finally:
            worker.send_signal(signal.SIGTERM)
            exit_code = worker.wait(timeout=15)

    assert reply.status_code == 200
    assert [row.published_at for row in unrelayed] == [None]
    assert relayed[0].published_at is not None
    assert exit_code == 0, (tmp_path / "worker.log").read_text()
