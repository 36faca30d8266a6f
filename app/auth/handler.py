"""The functions.auth.v1.AuthService implementation: unpack, call one use case, build the reply."""

from __future__ import annotations

from connectrpc.request import RequestContext
from functions.auth.v1 import auth_pb2
from google.protobuf import struct_pb2, timestamp_pb2

from app.auth import logic
from app.platform.context import require_principal
from app.platform.firebase import FirebaseAdmin
from app.settings import Settings


class AuthHandler:
    """AuthService over Firebase Auth."""

    def __init__(self, settings: Settings, firebase: FirebaseAdmin | None = None) -> None:
        """Create the service; without `firebase`, it creates a FirebaseAdmin from the settings."""
        self._firebase = firebase if firebase is not None else FirebaseAdmin.from_settings(settings)

    async def who_am_i(self, request: auth_pb2.WhoAmIRequest, ctx: RequestContext, /) -> auth_pb2.WhoAmIResponse:
        principal = require_principal()

        identity = logic.describe_caller(principal)

        custom_claims = struct_pb2.Struct()
        custom_claims.update(identity.custom_claims)
        return auth_pb2.WhoAmIResponse(
            uid=identity.uid,
            email=identity.email,
            email_verified=identity.email_verified,
            roles=identity.roles,
            sign_in_provider=identity.sign_in_provider,
            auth_time=_timestamp(identity.auth_time),
            expire_time=_timestamp(identity.expires_at),
            custom_claims=custom_claims,
        )

    async def set_roles(self, request: auth_pb2.SetRolesRequest, ctx: RequestContext, /) -> auth_pb2.SetRolesResponse:
        admin = require_principal()
        uid = request.uid
        roles = list(request.roles)

        assignment = await logic.set_roles(self._firebase, admin, uid, roles)

        return auth_pb2.SetRolesResponse(uid=assignment.uid, roles=assignment.roles)

    async def revoke_sessions(
        self, request: auth_pb2.RevokeSessionsRequest, ctx: RequestContext, /
    ) -> auth_pb2.RevokeSessionsResponse:
        principal = require_principal()

        revocation = await logic.revoke_sessions(self._firebase, principal, request.uid)

        revoke_time = timestamp_pb2.Timestamp()
        revoke_time.FromDatetime(revocation.revoke_time)
        return auth_pb2.RevokeSessionsResponse(uid=revocation.uid, revoke_time=revoke_time)


def _timestamp(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)