"""The functions.user.v1.UserService implementation: unpack, call one use case, build the reply."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from functions.user.v1 import user_pb2

from app.platform.context import Principal, current_principal
from app.platform.db import Database
from app.platform.errors import Unauthenticated
from app.users import logic
from app.users.convert import updatable_values, user_to_proto


class UserHandler:
    """UserService over the users tables."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def get_me(self, request: user_pb2.GetMeRequest, ctx: RequestContext, /) -> user_pb2.GetMeResponse:
        principal = _signed_in_principal()

        async with self._database.unit_of_work() as session:
            profile = await logic.get_or_create_profile(session, principal)

        return user_pb2.GetMeResponse(user=user_to_proto(profile))

    async def update_me(self, request: user_pb2.UpdateMeRequest, ctx: RequestContext, /) -> user_pb2.UpdateMeResponse:
        principal = _signed_in_principal()
        values = updatable_values(request.user)
        update_mask = list(request.update_mask.paths)

        async with self._database.unit_of_work() as session:
            profile = await logic.update_profile(session, principal, values, update_mask, request.etag)

        return user_pb2.UpdateMeResponse(user=user_to_proto(profile))

    async def get_user(self, request: user_pb2.GetUserRequest, ctx: RequestContext, /) -> user_pb2.GetUserResponse:
        # An empty uid means the caller. The policy interceptor has already checked that a
        # non-empty uid is the caller's own or that the caller is an admin.
        uid = request.uid or _signed_in_principal().uid

        async with self._database.unit_of_work() as session:
            profile = await logic.get_profile(session, uid)

        return user_pb2.GetUserResponse(user=user_to_proto(profile))

    async def delete_me(self, request: user_pb2.DeleteMeRequest, ctx: RequestContext, /) -> user_pb2.DeleteMeResponse:
        # NOTE: account deletion is not built yet; the method is declared so clients see unimplemented.
        raise ConnectError(Code.UNIMPLEMENTED, "DeleteMe is not implemented yet")

    async def list_users(self, request: user_pb2.ListUsersRequest, ctx: RequestContext, /) -> user_pb2.ListUsersResponse:
        async with self._database.unit_of_work() as session:
            page = await logic.list_profiles(session, request.page_size, request.page_token, request.email_prefix)

        return user_pb2.ListUsersResponse(
            users=[user_to_proto(profile) for profile in page.profiles],
            next_page_token=page.next_page_token,
        )


def _signed_in_principal() -> Principal:
    # The policy interceptor rejects calls without a principal first. This check covers a
    # handler that runs without that interceptor, as in tests.
    principal = current_principal()
    if principal is None:
        raise Unauthenticated("this method requires a signed-in caller: send 'Authorization: Bearer <Firebase ID token>'")
    return principal
