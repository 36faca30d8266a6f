"""Rejecting the ID tokens of deleted accounts in every domain, not only in the user domain.

An ID token stays valid until it expires, up to an hour, even after its Firebase account is
disabled. So the token verifier calls `deleted_account_checker` for each new token, and for a
cached one again every minute (see FirebaseTokenVerifier's revocation_checker). DeleteMe drops
the caller's cached tokens in the process that served it. On Postgres, the deletion's
transaction also sends `NOTIFY functions_account_deletions, '<uid>'`, and every process that
runs `AccountDeletionListener` drops that user's cached tokens at once too. Without it, as on
SQLite with one process, other processes reject the tokens within that minute.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from app.platform.context import Principal
from app.platform.db import Database
from app.platform.pubsub import PostgresListener, notify

log = logging.getLogger(__name__)

# The Postgres channel that carries the uid of each deleted account to every process.
DELETIONS_CHANNEL = "functions_account_deletions"
# How long startup waits for the first LISTEN before it goes on and the listener keeps retrying.
FIRST_LISTEN_WAIT_SECONDS = 5.0


def deleted_account_checker(database: Database) -> Callable[[Principal], Awaitable[None]]:
    """Return a check that raises Unauthenticated (ACCOUNT_DELETED) for a principal whose account was deleted.

    A database failure raises Unavailable, so a token is never accepted without the check.
    """
    # Imported here because logic imports this module for announce_deletion.
    from app.users import logic

    async def check(principal: Principal) -> None:
        async with database.unit_of_work() as session:
            await logic.reject_deleted_caller(session, principal)

    return check


async def announce_deletion(session: AsyncSession, uid: str) -> None:
    """Tell every process listening on Postgres, once the transaction commits, that `uid` was deleted."""
    if session.get_bind().dialect.name == "postgresql":
        await notify(session, DELETIONS_CHANNEL, [uid])


class AccountDeletionListener:
    """Drop the cached tokens of accounts deleted through any process, as their deletions commit."""

    def __init__(self, database: Database, forget_user: Callable[[str], None], forget_all: Callable[[], None], *, listen_url: str = "") -> None:
        """Listen on `listen_url` (DATABASE_LISTEN_URL), else on the database's own URL.

        `forget_all` runs whenever the listener (re)starts listening, because deletions announced
        while it was not listening are lost.
        """
        self._listener = PostgresListener(
            make_url(listen_url) if listen_url else database.engine.url, DELETIONS_CHANNEL, forget_user,
            on_listening=forget_all,
        )

    async def start(self) -> None:
        if not await self._listener.start(wait_seconds=FIRST_LISTEN_WAIT_SECONDS):
            log.warning("account deletions from other processes are not heard yet; retrying in the background")

    async def stop(self) -> None:
        await self._listener.stop()


async def start_deletion_listener(
    database: Database, forget_user: Callable[[str], None], forget_all: Callable[[], None], *, listen_url: str = ""
) -> AccountDeletionListener | None:
    """Start an AccountDeletionListener on Postgres; return None where it does not apply.

    SQLite runs one process, and LISTEN does not work through a transaction-mode pooler without
    `listen_url`. In that case other processes reject a deleted account's tokens within a minute.
    """
    if database.engine.dialect.name != "postgresql" or (database.uses_pooler and not listen_url):
        return None
    listener = AccountDeletionListener(database, forget_user, forget_all, listen_url=listen_url)
    await listener.start()
    return listener
