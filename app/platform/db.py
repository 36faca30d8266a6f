"""The database: engine configuration, units of work, migrations and failure translation.

Two engines are supported. The embedded default is a SQLite file (aiosqlite) under ./var/;
production is Postgres through asyncpg, directly or behind a transaction-mode pooler such as
PgBouncer or Supabase's pooler on port 6543.

Connection failures, pool timeouts and network errors leave this module as
`Unavailable("database unavailable; retry later")`. The original error is logged once at ERROR
with its traceback, and the engine hides SQL parameters so that log never carries user data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Insert, MetaData, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

from app.platform.deadlines import install_statement_timeout
from app.platform.errors import (
    Aborted,
    DeadlineExceeded,
    FieldViolation,
    InvalidInput,
    Unavailable,
)
from app.settings import Settings

log = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = "database unavailable; retry later"
# Supabase's transaction pooler listens on this port. Port 5432 is the direct or session connection.
TRANSACTION_POOLER_PORT = 6543
# URL query flag that marks a transaction pooler on any port, as in `...?pgbouncer=true`.
POOLER_QUERY_FLAG = "pgbouncer"
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# SQLSTATE classes that mean the server or pooler cannot serve the connection right now:
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "3D")
# SQLSTATE classes of Postgres: 22 is a value the column type cannot hold (NUL in text, a number
# out of range), 40 a serialization failure or deadlock that a retry may pass.
_DATA_EXCEPTION_CLASS = "22"
_TRANSACTION_ROLLBACK_CLASS = "40"
# query_canceled, which statement_timeout raises; its class 57 would otherwise read as an outage.
_QUERY_CANCELED = "57014"


class Base(DeclarativeBase):
    """Declarative base of every domain's tables."""

    # Constraint names fixed here stay stable across engines and migrations.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every engine.

    SQLite stores DateTime values without a zone and returns naive datetimes, so values are
    converted to UTC on the way in and marked as UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamps must be timezone-aware: got naive {value.isoformat()}")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The SQLAlchemy URL and create_async_engine options derived from the settings."""

    url: URL
    options: dict[str, Any]
    uses_pooler: bool = False


def engine_config(settings: Settings) -> EngineConfig:
    """Derive the engine URL and options from the settings.

    `postgres://` and `postgresql://` URLs use asyncpg, and `sslmode` becomes asyncpg's `ssl`.
    A URL counts as a transaction pooler when its port is 6543, when `database_pooler` is set,
    or when its query has `pgbouncer=true`. That flag is removed before connecting.
    """
    url = make_url(settings.database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_config(url, settings)
    # Heroku-style and libpq URLs spell the scheme `postgres://`.
    if backend in ("postgresql", "postgres"):
        return _postgres_config(url, settings)
    raise ValueError(f"DATABASE_URL must be a sqlite or postgresql URL: got backend {backend!r}")


def _sqlite_config(url: URL, settings: Settings) -> EngineConfig:
    url = url.set(drivername="sqlite+aiosqlite")
    if _is_sqlite_memory(url):
        # An in-memory database lives in its one connection, which SQLAlchemy keeps in a StaticPool.
        return EngineConfig(url=url, options={})
    options: dict[str, Any] = {
        "pool_size": settings.database_pool_size,
        "max_overflow": settings.database_max_overflow,
        "pool_timeout": settings.database_pool_timeout_seconds,
    }
    return EngineConfig(url=url, options=options)


def _postgres_config(url: URL, settings: Settings) -> EngineConfig:
    query = dict(url.query)
    pooler_flag = str(query.pop(POOLER_QUERY_FLAG, "")).lower() in ("true", "1", "yes")
    if "sslmode" in query:
        # asyncpg takes libpq's sslmode values under the name `ssl`.
        query["ssl"] = query.pop("sslmode")
    url = url.set(drivername="postgresql+asyncpg", query=query)
    uses_pooler = settings.database_pooler or pooler_flag or url.port == TRANSACTION_POOLER_PORT

    # NOTE: DATABASE_POOL_TIMEOUT_SECONDS also bounds connecting. A separate connect timeout
    # setting would let the two differ.
    connect_args: dict[str, Any] = {
        "timeout": settings.database_pool_timeout_seconds,
        "server_settings": {"application_name": "functions"},
    }
    if uses_pooler:
        # A transaction pooler hands each transaction to any server connection, so a statement
        # prepared by name in one transaction is missing or taken in the next. asyncpg's own
        # cache and SQLAlchemy's cache must both be off, so that every statement is unnamed.
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0

    # Each pooled connection is one client of the pooler or one server backend. Pre-ping
    # replaces pooled connections that the pooler or server closed, for example on a restart.
    options: dict[str, Any] = {
        "pool_size": settings.database_pool_size,
        "max_overflow": settings.database_max_overflow,
        "pool_timeout": settings.database_pool_timeout_seconds,
        "pool_pre_ping": True,
        "connect_args": connect_args,
    }
    return EngineConfig(url=url, options=options, uses_pooler=uses_pooler)


def _is_sqlite_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


def _create_sqlite_directory(url: URL) -> None:
    database = url.database or ""
    if _is_sqlite_memory(url) or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _configure_sqlite_connections(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def set_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the one writer. busy_timeout makes a second writer wait
        # for the lock instead of failing at once. SQLite enforces foreign keys only when enabled.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()


def is_unavailable_error(error: BaseException) -> bool:
    """Return whether an exception means the database cannot be reached or is overloaded."""
    if isinstance(error, (sa_exc.TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    for cause in _exception_chain(error):
        if isinstance(cause, OSError) or _is_asyncpg_connection_error(cause):
            return True
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            return True
    return False


def _is_asyncpg_connection_error(error: BaseException) -> bool:
    # asyncpg costs memory that a SQLite deployment never needs; if it was never imported,
    # no error can come from it.
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is None:
        return False
    return isinstance(error, asyncpg.exceptions.InterfaceError | asyncpg.exceptions.PostgresConnectionError)


def _sqlstate(error: BaseException) -> str | None:
    for cause in _exception_chain(error):
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate
    return None


def _sqlstate_class(error: BaseException) -> str | None:
    sqlstate = _sqlstate(error)
    return sqlstate[:2] if sqlstate else None


def _translate_statement_error(error: BaseException) -> Exception | None:
    """Return the service error for a statement the database rejected, or None when it is unexpected.

    Validation should reject such values first, so this only backs it up; the message names no SQL.
    """
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    sqlstate_class = _sqlstate_class(error)
    if sqlstate_class == _DATA_EXCEPTION_CLASS:
        log.warning("the database rejected a value: %s", type(error.orig).__name__)
        return InvalidInput(FieldViolation("request", "contains a value the database cannot store, such as a NUL character"))
    if sqlstate_class == _TRANSACTION_ROLLBACK_CLASS:
        log.warning("transaction rolled back by the database: %s", type(error.orig).__name__)
        return Aborted("the change conflicted with a concurrent one; retry")
    return None


def _exception_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        if isinstance(current, sa_exc.DBAPIError) and isinstance(current.orig, BaseException):
            current = current.orig
        else:
            current = current.__cause__
    return chain


def _unavailable(error: BaseException) -> Unavailable:
    log.error(UNAVAILABLE_MESSAGE, exc_info=error, extra={"error_type": type(error).__name__})
    return Unavailable(UNAVAILABLE_MESSAGE)


class Database:
    """The engine and session factory shared by every domain."""

    def __init__(self, engine: AsyncEngine, *, uses_pooler: bool = False) -> None:
        self.engine = engine
        self.uses_pooler = uses_pooler
        # Objects stay readable after commit, because building the response must not reload.
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """Create the engine for DATABASE_URL. Nothing connects before the first use."""
        config = engine_config(settings)
        engine = create_async_engine(config.url, hide_parameters=True, **config.options)
        if config.url.get_backend_name() == "sqlite":
            _create_sqlite_directory(config.url)
            _configure_sqlite_connections(engine, busy_timeout_ms=int(settings.database_pool_timeout_seconds * 1000))
        else:
            install_statement_timeout(engine)
        return cls(engine, uses_pooler=config.uses_pooler)

    @contextlib.asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """Open a session and commit it when the block succeeds, or roll it back when it raises.

        The session is closed in every case. Connection failures, pool timeouts and network
        errors, whether raised in the block or by the commit, become Unavailable.
        """
        session = self._sessions()
        try:
            yield session
            await session.commit()
        except Exception as error:
            await self._rollback(session)
            if _sqlstate(error) == _QUERY_CANCELED:
                # statement_timeout, set from the call's deadline, stopped the statement.
                raise DeadlineExceeded("the call's deadline passed during a database statement") from error
            if is_unavailable_error(error):
                raise _unavailable(error) from error
            translated = _translate_statement_error(error)
            if translated is not None:
                raise translated from error
            raise
        finally:
            await self._close(session)

    async def ping(self) -> None:
        """Run `SELECT 1` and raise Unavailable when the database cannot be reached."""
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as error:
            if is_unavailable_error(error):
                raise _unavailable(error) from error
            raise

    async def schema_revision(self) -> str | None:
        """Return the Alembic revision the database is at, or None before the first migration.

        Raise Unavailable when the database cannot be reached.
        """
        try:
            async with self.engine.connect() as connection:
                if not await connection.run_sync(lambda sync_connection: inspect(sync_connection).has_table("alembic_version")):
                    return None
                return (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        except Exception as error:
            if is_unavailable_error(error):
                raise _unavailable(error) from error
            raise

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    async def _rollback(self, session: AsyncSession) -> None:
        try:
            await session.rollback()
        except Exception as error:  # noqa: BLE001 - the error that caused the rollback matters more
            log.debug("rollback failed after an error: %s", type(error).__name__)

    async def _close(self, session: AsyncSession) -> None:
        try:
            await session.close()
        except Exception as error:  # noqa: BLE001 - a dead connection is discarded by the pool anyway
            log.debug("closing a session failed: %s", type(error).__name__)


async def migrate(settings: Settings) -> None:
    """Upgrade the database named by DATABASE_URL to the newest migration."""
    from alembic import command

    database = Database.from_settings(settings)
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(lambda sync_connection: command.upgrade(alembic_config(sync_connection), "head"))
    except Exception as error:
        if is_unavailable_error(error):
            raise _unavailable(error) from error
        raise
    finally:
        await database.dispose()


@functools.cache
def head_revision() -> str:
    """Return the newest migration's revision, which this build's code expects the database at."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def is_known_revision(revision: str) -> bool:
    """Return whether `revision` is one of this build's migrations."""
    return revision in _known_revisions()


@functools.cache
def _known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    return frozenset(script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def alembic_config(connection: Any = None) -> Any:
    """Build the Alembic configuration. migrations/env.py migrates over `connection` when one is given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def run_migrations(settings: Settings) -> None:
    """Run `migrate` from synchronous code such as the command line."""
    asyncio.run(migrate(settings))


def insert_ignoring_conflicts(session: AsyncSession, table: type[Base], values: dict[str, object]) -> Insert:
    """Build an INSERT of one row that does nothing when the row's key already exists."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).values(values).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).values(values).on_conflict_do_nothing()
    raise NotImplementedError(f"supported databases are postgresql and sqlite: got dialect {dialect!r}")


async def lock_for_writing(session: AsyncSession, key: str, table: type[Base]) -> None:
    """Make other transactions that lock the same `key` wait until this one ends; call it before reading.

    On Postgres this takes a transaction-scoped advisory lock on the key, so only writers of the
    same key wait. SQLite allows one writer at a time, so there an UPDATE of `table` that changes
    no row makes this transaction the writer. Reading first would let two transactions read the
    same state, and both would then act on it.
    """
    if session.get_bind().dialect.name == "postgresql":
        # hashtext collisions only make writers of two keys wait for each other.
        await session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
        return
    primary_key = table.__table__.primary_key.columns[0].name
    await session.execute(text(f"UPDATE {table.__tablename__} SET {primary_key} = {primary_key} WHERE 0 = 1"))
