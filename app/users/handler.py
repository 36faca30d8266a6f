"""The functions.user.v1.UserService implementation: unpack, call one use case, build the reply."""

from __future__ import annotations

import logging
from collections.abc import Callable

from connectrpc.request import RequestContext
from functions.user.v1 import user_pb2

from app.platform.context import require_principal
from app.platform.db import Database
from app.platform.errors import Unavailable
from app.platform.firebase import FirebaseAdmin
from app.platform.timestamps import timestamp_of
from app.users import logic
from app.users.convert import updatable_values, user_to_proto
from app.users.events import DISABLE_SIGN_IN_CONSUMER_NAME

log = logging.getLogger(__name__)


class UserHandler:
    """UserService over the users tables."""

    def __init__(
        self,
        database: Database,
        firebase: FirebaseAdmin | None = None,
        *,
        on_account_deleted: Callable[[str], None] | None = None,
        disable_retried: bool = False,
        firebase_accounts: bool = True,
    ) -> None:
        """Create the service.

        Args:
            firebase: disables the Firebase user of a deleted account. Without it, DeleteMe still
                deletes the profile but then fails with failed_precondition.
            on_account_deleted: called with the uid once a deletion commits, e.g. to drop the
                user's cached tokens.
            disable_retried: whether the UserDeleted consumer of app.users.events runs. DeleteMe
                then succeeds when Firebase is unavailable, because that consumer retries.
            firebase_accounts: false when users sign in with development keys, so that they have
                no Firebase account for DeleteMe to disable.
        """
        self._database = database
        self._firebase = firebase
        self._on_account_deleted = on_account_deleted
        self._disable_retried = disable_retried
        self._firebase_accounts = firebase_accounts

    async def get_me(self, request: user_pb2.GetMeRequest, ctx: RequestContext, /) -> user_pb2.GetMeResponse:
        principal = require_principal()

        async with self._database.unit_of_work() as session:
            profile = await logic.get_or_create_profile(session, principal)

        return user_pb2.GetMeResponse(user=user_to_proto(profile))

    async def update_me(self, request: user_pb2.UpdateMeRequest, ctx: RequestContext, /) -> user_pb2.UpdateMeResponse:
        principal = require_principal()
        values = updatable_values(request.user)
        update_mask = list(request.update_mask.paths)

        async with self._database.unit_of_work() as session:
            profile = await logic.update_profile(session, principal, values, update_mask, request.etag)

        return user_pb2.UpdateMeResponse(user=user_to_proto(profile))

    async def get_user(self, request: user_pb2.GetUserRequest, ctx: RequestContext, /) -> user_pb2.GetUserResponse:
        # An empty uid means the caller. The policy interceptor has already checked that a
        # non-empty uid is the caller's own or that the caller is an admin.
        principal = require_principal()
        uid = request.uid or principal.uid

        async with self._database.unit_of_work() as session:
            profile = await logic.get_profile(session, uid, caller=principal)

        return user_pb2.GetUserResponse(user=user_to_proto(profile))

    async def delete_me(self, request: user_pb2.DeleteMeRequest, ctx: RequestContext, /) -> user_pb2.DeleteMeResponse:
        principal = require_principal()

        # The deletion commits before Firebase is called. In the other order, a failure after
        # disabling the Firebase user would leave a profile that its owner can no longer delete,
        # because their tokens are then rejected. In this order, a repeated DeleteMe finishes it.
        async with self._database.unit_of_work() as session:
            profile = await logic.delete_profile(session, principal, request.etag)
        if self._on_account_deleted is not None:
            self._on_account_deleted(profile.uid)
        if not self._firebase_accounts:
            log.info("deleted user signs in with development keys: no Firebase account to disable", extra={"uid": profile.uid})
            return user_pb2.DeleteMeResponse(uid=profile.uid, delete_time=timestamp_of(profile.delete_time))
        try:
            await logic.disable_sign_in(self._firebase, profile.uid)
        except Unavailable:
            if not self._disable_retried:
                raise
            log.warning(
                "Firebase account of a deleted user is not disabled yet; the %s consumer retries",
                DISABLE_SIGN_IN_CONSUMER_NAME, extra={"uid": profile.uid},
            )

        return user_pb2.DeleteMeResponse(uid=profile.uid, delete_time=timestamp_of(profile.delete_time))

    async def list_users(self, request: user_pb2.ListUsersRequest, ctx: RequestContext, /) -> user_pb2.ListUsersResponse:
        principal = require_principal()

        async with self._database.unit_of_work() as session:
            page = await logic.list_profiles(
                session, request.page_size, request.page_token, request.email_prefix, caller=principal
            )

        return user_pb2.ListUsersResponse(
            users=[user_to_proto(profile) for profile in page.profiles],
            next_page_token=page.next_page_token,
        )