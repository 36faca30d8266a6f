"""Throwaway databases for tests: a SQLite file, or a fresh Postgres database per session.

Postgres runs only when TEST_POSTGRES_URL names a server, as CI sets it. Each session creates
its own uniquely named database there and drops it at the end, so parallel runs never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL_VARIABLE = "TEST_POSTGRES_URL"
POSTGRES_MISSING = f"{POSTGRES_URL_VARIABLE} is not set: set it to a Postgres server URL to run the Postgres tests"
BACKENDS = [
    "sqlite",
    pytest.param(
        "postgres", marks=pytest.mark.skipif(not os.environ.get(POSTGRES_URL_VARIABLE), reason=POSTGRES_MISSING)
    ),
]


async def run_admin_sql(statement: str, server_url: str | None = None) -> None:
    """Run one statement outside a transaction on the maintenance database of TEST_POSTGRES_URL."""
    url = make_url(server_url or os.environ[POSTGRES_URL_VARIABLE])
    connection = await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=url.database or "postgres",
    )
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_postgres_database(prefix: str = "functions_test") -> tuple[str, str]:
    """Create a uniquely named database on TEST_POSTGRES_URL's server; return its name and asyncpg URL."""
    server_url = os.environ[POSTGRES_URL_VARIABLE]
    name = f"{prefix}_{secrets.token_hex(6)}"
    await run_admin_sql(f'CREATE DATABASE "{name}"', server_url)
    url = make_url(server_url).set(drivername="postgresql+asyncpg", database=name)
    return name, url.render_as_string(hide_password=False)


async def drop_postgres_database(name: str) -> None:
    """Drop a database made by create_postgres_database, ending connections still open to it."""
    await run_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_database(prefix: str = "functions_test") -> Iterator[str]:
    """Yield the URL of a fresh Postgres database, for code outside an event loop."""
    name, url = asyncio.run(create_postgres_database(prefix))
    try:
        yield url
    finally:
        asyncio.run(drop_postgres_database(name))


@contextlib.contextmanager
def database_url(backend: str, directory: Path) -> Iterator[str]:
    """Yield the URL of an empty database of the given backend."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / 'functions.db'}"
        return
    with postgres_database() as url:
        yield url


def pgmq_sql_path() -> Path:
    """Locate pgmq/sql/pgmq.sql in the installed pgmq package without importing it."""
    spec = importlib.util.find_spec("pgmq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the pgmq package is not installed: pip install pgmq==1.1.4")
    return Path(next(iter(spec.submodule_search_locations))) / "sql" / "pgmq.sql"


async def load_pgmq_sql(database_url: str) -> None:
    """Load the SQL of the pgmq package into the Postgres database at `database_url`."""
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        database=url.database,
    )
    try:
        await connection.execute(pgmq_sql_path().read_text())
    finally:
        await connection.close()
