"""An event committed by a process that dies before relaying it is delivered after a restart.

The first process records a profile and its UserCreated event in one transaction through the
real logic, commits, and kills itself with SIGKILL before any relay runs: the crash between
commit and publish. A server started on the same database then relays the event.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.platform.db import Database
from app.platform.events import OutboxEventRow
from app.settings import Settings
from tests.databases import BACKENDS, database_url
from tests.e2e.conftest import server_env
from tests.servers import ROOT, run_migrations, run_server

CRASHING_WRITER = """
import asyncio, os, signal
from app.platform.context import Principal
from app.platform.db import Database
from app.settings import Settings
from app.users import logic

async def main():
    database = Database.from_settings(Settings())
    async with database.unit_of_work() as session:
        await logic.get_or_create_profile(session, Principal(uid="crash-1", email="crash-1@example.com"))
    # Committed; no relay ever ran in this process.
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def outbox_rows(url: str) -> list[OutboxEventRow]:
    database = Database.from_settings(Settings(app_env="test", database_url=url))
    try:
        async with database.unit_of_work() as session:
            return list((await session.execute(select(OutboxEventRow))).scalars())
    finally:
        await database.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_event_committed_before_crash_is_delivered(backend, tmp_path: Path, cert_server) -> None:
    with database_url(backend, tmp_path) as url:
        env = server_env(cert_server, url, DEV_KEYS_DIR=str(tmp_path / "keys"))
        run_migrations(env)

        writer = subprocess.run(
            [sys.executable, "-c", CRASHING_WRITER], env={**os.environ, **env}, cwd=ROOT, capture_output=True, timeout=60
        )
        before = asyncio.run(outbox_rows(url))

        with run_server(env, tmp_path / "server.log"):
            deadline = time.monotonic() + 10
            after = asyncio.run(outbox_rows(url))
            while any(row.published_at is None for row in after) and time.monotonic() < deadline:
                time.sleep(0.2)
                after = asyncio.run(outbox_rows(url))

    assert writer.returncode == -9, writer.stderr
    assert [row.type for row in before] == ["functions.events.v1.UserCreated"]
    assert before[0].published_at is None
    assert [row.id for row in after] == [before[0].id]
    assert after[0].published_at is not None
