"""Database: URL handling, units of work, and failures reported as Unavailable."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

# Every model module, so that Base.metadata has every table the migrations create.
import app.files.model  # noqa: F401
import app.notifications.model  # noqa: F401
from app.platform.db import UNAVAILABLE_MESSAGE, Base, Database, engine_config
from app.platform.errors import DeadlineExceeded, InvalidInput, Unavailable
from app.users import store
from app.users.model import UserRow
from tests.databases import (
    POSTGRES_MISSING,
    POSTGRES_URL_VARIABLE,
    create_postgres_database,
    drop_postgres_database,
    run_admin_sql,
)
from tests.integration.factories import new_profile, settings_for
from tests.servers import free_port


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@db.example.com:5432/app", "postgresql+asyncpg://u:***@db.example.com:5432/app"),
        ("postgresql://u@db.example.com/app", "postgresql+asyncpg://u@db.example.com/app"),
        ("postgresql+asyncpg://u@db.example.com/app", "postgresql+asyncpg://u@db.example.com/app"),
        ("postgresql://u@db.example.com/app?sslmode=require", "postgresql+asyncpg://u@db.example.com/app?ssl=require"),
        ("postgresql://u@db.example.com:6432/app?pgbouncer=true", "postgresql+asyncpg://u@db.example.com:6432/app"),
        ("sqlite:///./var/functions.db", "sqlite+aiosqlite:///./var/functions.db"),
    ],
)
def test_url_is_normalized(url: str, expected: str) -> None:
    config = engine_config(settings_for(url))

    assert config.url.render_as_string(hide_password=True) == expected


@pytest.mark.parametrize(
    ("url", "database_pooler"),
    [
        ("postgresql://u@aws-0-eu-west-1.pooler.supabase.com:6543/postgres", False),
        ("postgresql://u@db.example.com:6432/app?pgbouncer=true", False),
        ("postgresql://u@db.example.com:5432/app", True),
    ],
)
def test_pooler_url_turns_statement_caches_off(url: str, database_pooler: bool) -> None:
    config = engine_config(settings_for(url, database_pooler=database_pooler))

    assert config.uses_pooler is True
    assert config.options["connect_args"]["statement_cache_size"] == 0
    assert config.options["connect_args"]["prepared_statement_cache_size"] == 0


def test_direct_url_keeps_statement_caches() -> None:
    config = engine_config(settings_for("postgresql://u@db.example.com:5432/app"))

    assert config.uses_pooler is False
    assert "statement_cache_size" not in config.options["connect_args"]
    assert "prepared_statement_cache_size" not in config.options["connect_args"]


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="DATABASE_URL must be a sqlite or postgresql URL: got scheme 'mysql'"):
        engine_config(settings_for("mysql://u@db.example.com/app"))


async def test_sqlite_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "var" / "functions.db"

    database = Database.from_settings(settings_for(f"sqlite+aiosqlite:///{path}"))
    try:
        await database.ping()
    finally:
        await database.dispose()

    assert path.parent.is_dir()


async def test_sqlite_connections_use_wal_and_foreign_keys(sqlite_database: Database) -> None:
    async with sqlite_database.unit_of_work() as session:
        journal_mode = await session.scalar(text("PRAGMA journal_mode"))
        foreign_keys = await session.scalar(text("PRAGMA foreign_keys"))
        busy_timeout = await session.scalar(text("PRAGMA busy_timeout"))

    assert journal_mode == "wal"
    assert foreign_keys == 1
    assert busy_timeout > 0


async def test_unit_of_work_commits_on_success(database: Database) -> None:
    uid = f"commit-{secrets.token_hex(6)}"

    async with database.unit_of_work() as session:
        await store.add_user(session, new_profile(uid))

    async with database.unit_of_work() as session:
        assert await store.find_user(session, uid) is not None


async def test_unit_of_work_rolls_back_on_error(database: Database) -> None:
    uid = f"rollback-{secrets.token_hex(6)}"

    with pytest.raises(RuntimeError, match="stop here"):
        async with database.unit_of_work() as session:
            await store.add_user(session, new_profile(uid))
            raise RuntimeError("stop here")

    async with database.unit_of_work() as session:
        count = await session.scalar(select(func.count()).select_from(UserRow).where(UserRow.uid == uid))
    assert count == 0


async def test_ping_succeeds_on_live_database(database: Database) -> None:
    await database.ping()


async def test_unreachable_postgres_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql+asyncpg://postgres:secret-password@127.0.0.1:{free_port()}/functions"
    database = Database.from_settings(settings_for(url, database_pool_timeout_seconds=1.0))
    caplog.set_level(logging.ERROR, logger="app.platform.db")

    try:
        with pytest.raises(Unavailable) as caught:
            async with database.unit_of_work() as session:
                await store.find_user(session, "anyone")
    finally:
        await database.dispose()

    assert caught.value.message == UNAVAILABLE_MESSAGE
    errors = [record for record in caplog.records if record.name == "app.platform.db"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "secret-password" not in caplog.text


async def test_ping_of_unreachable_postgres_is_unavailable() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/functions"
    database = Database.from_settings(settings_for(url, database_pool_timeout_seconds=1.0))

    try:
        with pytest.raises(Unavailable, match=UNAVAILABLE_MESSAGE):
            await database.ping()
    finally:
        await database.dispose()


async def test_exhausted_pool_is_unavailable(tmp_path: Path) -> None:
    settings = settings_for(
        f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}",
        database_pool_size=1,
        database_max_overflow=0,
        database_pool_timeout_seconds=0.2,
    )
    database = Database.from_settings(settings)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold_connection() -> None:
        async with database.unit_of_work() as session:
            await session.connection()
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold_connection())
    try:
        await holding.wait()
        with pytest.raises(Unavailable, match=UNAVAILABLE_MESSAGE):
            async with database.unit_of_work() as session:
                await session.connection()
    finally:
        release.set()
        await holder
        await database.dispose()


async def test_migrations_match_models(database: Database) -> None:
    def compare(connection) -> list:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    async with database.engine.connect() as connection:
        differences = await connection.run_sync(compare)

    assert differences == []


async def test_value_postgres_cannot_store_is_invalid_input(postgres_database: Database) -> None:
    with pytest.raises(InvalidInput) as raised:
        async with postgres_database.unit_of_work() as session:
            await session.execute(text("SELECT CAST(:value AS text)"), {"value": "a\x00b"})

    assert raised.value.violations[0].field == "request"
    assert "SELECT" not in raised.value.message


async def test_renamed_database_is_unavailable_then_recovers() -> None:
    if not os.environ.get(POSTGRES_URL_VARIABLE):
        pytest.skip(POSTGRES_MISSING)
    name, url = await create_postgres_database("functions_rename")
    moved = f"{name}_moved"
    database = Database.from_settings(settings_for(url))
    try:
        await database.ping()
        await database.dispose()
        await run_admin_sql(f'ALTER DATABASE "{name}" RENAME TO "{moved}"')

        with pytest.raises(Unavailable) as raised:
            async with database.unit_of_work() as session:
                await session.execute(text("SELECT 1"))

        await run_admin_sql(f'ALTER DATABASE "{moved}" RENAME TO "{name}"')
        async with database.unit_of_work() as session:
            recovered = (await session.execute(text("SELECT 1"))).scalar_one()
    finally:
        await database.dispose()
        await run_admin_sql(f'DROP DATABASE IF EXISTS "{moved}" WITH (FORCE)')
        await drop_postgres_database(name)

    assert raised.value.message == UNAVAILABLE_MESSAGE
    assert recovered == 1


async def test_statement_timeout_is_deadline_exceeded(postgres_database: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="app.platform.db")

    with pytest.raises(DeadlineExceeded):
        async with postgres_database.unit_of_work() as session:
            await session.execute(text("SET LOCAL statement_timeout = 100"))
            await session.execute(text("SELECT pg_sleep(2)"))

    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
