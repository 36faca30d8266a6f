"""Rejecting the ID tokens of deleted accounts in every domain, not only in the user domain.

An ID token stays valid until it expires, up to an hour, even after its Firebase account is
disabled. So the token verifier calls `deleted_account_checker` for each new token, and for a
cached one again every minute (see FirebaseTokenVerifier's revocation_checker). DeleteMe drops
the caller's cached tokens in the process that served it, so that process rejects the next call
at once. Other processes reject it within that minute.
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
