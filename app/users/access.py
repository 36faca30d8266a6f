"""Refusing the ID tokens of deleted accounts in every domain, not only in the user domain.

Firebase keeps accepting an ID token until it expires, up to an hour, even after the account
is disabled. The token verifier therefore asks `deleted_account_checker` about each new token
and again about a cached one every minute (see FirebaseTokenVerifier's revocation_checker).
DeleteMe drops the caller's cached tokens in the process that served it, so there the next call
is refused at once; other processes refuse it within that minute.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from app.platform.context import Principal
from app.platform.db import Database
from app.users import logic


def deleted_account_checker(database: Database) -> Callable[[Principal], Awaitable[None]]:
    """Return a check that raises Unauthenticated (ACCOUNT_DELETED) for a principal whose account was deleted.

    A database failure raises Unavailable, so a token is never accepted without the check.
    """

    async def check(principal: Principal) -> None:
        async with database.unit_of_work() as session:
            await logic.reject_deleted_caller(session, principal)

    return check
