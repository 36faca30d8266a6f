"""Alembic environment: runs migrations on a connection the service provides, or on its own.

`app.platform.db.migrate` passes a connection in `config.attributes["connection"]`. The
`alembic` command line passes none, so this module opens the database named by DATABASE_URL
with the same engine options as the service.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

import app.files.model  # noqa: F401 - registers the files table on Base.metadata
import app.notifications.model  # noqa: F401 - registers the notifications tables on Base.metadata
import app.platform.events  # noqa: F401 - registers the event tables on Base.metadata
import app.users.model  # noqa: F401 - registers the users tables on Base.metadata
from app.platform.db import Base, Database, engine_config
from app.settings import Settings

config = context.config
target_metadata = Base.metadata


def run_with_connection(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_with_own_engine() -> None:
    database = Database.from_settings(Settings())
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(run_with_connection)
    finally:
        await database.dispose()


def run_offline() -> None:
    url = engine_config(Settings()).url
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


given_connection = config.attributes.get("connection")
# Only the command line configures logging here; the service has its own setup.
if given_connection is None and config.config_file_name is not None:
    fileConfig(config.config_file_name)

if given_connection is not None:
    run_with_connection(given_connection)
elif context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_with_own_engine())
