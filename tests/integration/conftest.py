"""Fixtures for tests against real databases.

`database` runs each test twice: on a migrated SQLite file and on a migrated Postgres database.
The Postgres run needs TEST_POSTGRES_URL, for example
postgresql+asyncpg://postgres@127.0.0.1:5432/test. It creates a database with a random name on
that server for the test session and drops it at the end, so concurrent sessions never share
tables. Tests share one database per engine, so each test uses its own uids and email prefixes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.platform.db import Database, migrate
from tests.databases import (
    POSTGRES_MISSING,
    POSTGRES_URL_VARIABLE,
    create_postgres_database,
    drop_postgres_database,
)
from tests.integration.factories import settings_for


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """Create a Postgres database for this test session, yield its URL, then drop it."""
    if not os.environ.get(POSTGRES_URL_VARIABLE):
        pytest.skip(POSTGRES_MISSING)

    name, url = await create_postgres_database()
    yield url
    # Dropping with FORCE ends connections a test left open, such as those of a stopped pooler.
    await drop_postgres_database(name)


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
