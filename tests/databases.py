"""Throwaway databases for tests: a SQLite file, or a fresh Postgres database per session.

Postgres runs only when TEST_POSTGRES_URL names a server (CI sets it); each session creates
its own uniquely named database there and drops it at the end, so parallel runs never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL_VARIABLE = "TEST_POSTGRES_URL"
BACKENDS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=pytest.mark.skipif(
            not os.environ.get(POSTGRES_URL_VARIABLE), reason=f"{POSTGRES_URL_VARIABLE} is not set"
        ),
    ),
]


def _run_admin_sql(server_url: str, statement: str) -> None:
    """Run one statement outside a transaction on the server's maintenance database."""
    url = make_url(server_url)

    async def run() -> None:
        connection = await asyncpg.connect(
            host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username or "postgres",
            password=url.password, database=url.database or "postgres",
        )
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@contextlib.contextmanager
def postgres_database(prefix: str = "functions_test") -> Iterator[str]:
    """Create a uniquely named database on TEST_POSTGRES_URL's server; yield its asyncpg URL."""
    server_url = os.environ[POSTGRES_URL_VARIABLE]
    name = f"{prefix}_{secrets.token_hex(6)}"
    _run_admin_sql(server_url, f'CREATE DATABASE "{name}"')
    try:
        url = make_url(server_url).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        _run_admin_sql(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database_url(backend: str, directory: Path) -> Iterator[str]:
    """Yield the URL of an empty database of the given backend."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / 'functions.db'}"
        return
    with postgres_database() as url:
        yield url
