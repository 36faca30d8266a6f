"""Fixtures for tests against real databases.

`database` runs each test twice: on a migrated SQLite file and on a migrated Postgres database.
The Postgres run needs TEST_POSTGRES_URL, for example
postgresql+asyncpg://postgres@127.0.0.1:5432/test. It creates a database with a random name on
that server for the test session and drops it at the end, so concurrent sessions never share
tables. Tests share one database per engine, so each test uses its own uids and email prefixes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url

from app.platform.db import Database, migrate
from app.settings import Settings

POSTGRES_URL_VARIABLE = "TEST_POSTGRES_URL"


def settings_for(database_url: str, **overrides: object) -> Settings:
    """Build test settings for a database URL."""
    return Settings(app_env="test", database_url=database_url, **overrides)


async def _connect_admin(server_url: URL) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=server_url.host or "127.0.0.1",
        port=server_url.port or 5432,
        user=server_url.username or "postgres",
        password=server_url.password,
        database=server_url.database or "postgres",
    )


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """Create a Postgres database for this test session, yield its URL, then drop it."""
    server_url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not server_url:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set: set it to a Postgres server URL to run the Postgres tests")

    url = make_url(server_url)
    name = f"functions_test_{secrets.token_hex(6)}"
    admin = await _connect_admin(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    yield url.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)

    admin = await _connect_admin(url)
    try:
        # FORCE ends connections a test left open, such as those of a stopped pooler.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def postgres_database(postgres_url: str) -> AsyncIterator[Database]:
    """Migrate the session's Postgres database and open it."""
    settings = settings_for(postgres_url)
    await migrate(settings)
    database = Database.from_settings(settings)
    yield database
    await database.dispose()


@pytest.fixture(scope="session")
async def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Database]:
    """Migrate a SQLite file in a temporary directory and open it."""
    path: Path = tmp_path_factory.mktemp("sqlite") / "functions.db"
    settings = settings_for(f"sqlite+aiosqlite:///{path}")
    await migrate(settings)
    database = Database.from_settings(settings)
    yield database
    await database.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> Database:
    """A migrated database, once per engine."""
    # A synchronous fixture can resolve the async ones while the event loop is idle.
    return request.getfixturevalue(f"{request.param}_database")
