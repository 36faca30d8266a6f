"""AuthService on a real server in emulator mode, with users and tokens from the real Auth emulator."""

from __future__ import annotations

import time

import pytest
from functions.auth.v1 import auth_pb2

from tests.e2e.clients import ALL_PROTOCOLS, Protocol, RpcError, call
from tests.support.emulator import token_claims, wait_until_after

pytestmark = pytest.mark.emulator

SERVICE = "functions.auth.v1.AuthService"
# Connect JSON as curl and browsers send it, and native gRPC.
MAIN_PROTOCOLS = [Protocol.CONNECT_JSON, Protocol.GRPC]


async def who_am_i(server, token: str | None, protocol: Protocol = Protocol.CONNECT_JSON) -> auth_pb2.WhoAmIResponse:
    return await call(
        protocol, server.address, SERVICE, "WhoAmI", auth_pb2.WhoAmIRequest(), auth_pb2.WhoAmIResponse, token=token
    )


async def set_roles(
    server, token: str, uid: str, roles: list[str], protocol: Protocol = Protocol.CONNECT_JSON
) -> auth_pb2.SetRolesResponse:
    request = auth_pb2.SetRolesRequest(uid=uid, roles=roles)
    return await call(protocol, server.address, SERVICE, "SetRoles", request, auth_pb2.SetRolesResponse, token=token)


async def revoke_sessions(
    server, token: str, uid: str = "", protocol: Protocol = Protocol.CONNECT_JSON
) -> auth_pb2.RevokeSessionsResponse:
    request = auth_pb2.RevokeSessionsRequest(uid=uid)
    return await call(
        protocol, server.address, SERVICE, "RevokeSessions", request, auth_pb2.RevokeSessionsResponse, token=token
    )


@pytest.mark.parametrize("protocol", ALL_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_who_am_i_returns_emulator_user(auth_server, user, protocol):
    claims = token_claims(user.id_token)

    identity = await who_am_i(auth_server, user.id_token, protocol)

    assert identity.uid == user.uid
    assert identity.email == user.email
    assert identity.email_verified is False
    assert list(identity.roles) == []
    assert identity.sign_in_provider == "password"
    assert identity.auth_time.seconds == claims["auth_time"]
    assert identity.expire_time.seconds == claims["exp"]
    assert dict(identity.custom_claims) == {}


async def test_who_am_i_shows_custom_claims(auth_server, auth_emulator, user):
    auth_emulator.set_custom_claims(user.uid, {"roles": ["editor"], "tier": "gold"})
    token = auth_emulator.refresh(user)

    identity = await who_am_i(auth_server, token)

    assert list(identity.roles) == ["editor"]
    assert identity.custom_claims["tier"] == "gold"
    assert list(identity.custom_claims["roles"]) == ["editor"]
    assert "firebase" not in identity.custom_claims
    assert "user_id" not in identity.custom_claims


async def test_who_am_i_without_token_is_unauthenticated(auth_server):
    with pytest.raises(RpcError) as raised:
        await who_am_i(auth_server, None)

    assert raised.value.code == "unauthenticated"


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_set_roles_by_non_admin_is_denied(auth_server, auth_emulator, user, protocol):
    other = auth_emulator.sign_up()

    with pytest.raises(RpcError) as raised:
        await set_roles(auth_server, user.id_token, other.uid, ["editor"], protocol)

    assert raised.value.code == "permission_denied"
    assert auth_emulator.lookup(other.uid).get("customAttributes", "{}") == "{}"


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_set_roles_reaches_refreshed_token(auth_server, auth_emulator, admin, user, protocol):
    auth_emulator.set_custom_claims(user.uid, {"tier": "gold"})

    reply = await set_roles(auth_server, admin.id_token, user.uid, ["editor", "viewer"], protocol)
    identity = await who_am_i(auth_server, auth_emulator.refresh(user), protocol)

    assert reply.uid == user.uid
    assert list(reply.roles) == ["editor", "viewer"]
    assert list(identity.roles) == ["editor", "viewer"]
    assert identity.custom_claims["tier"] == "gold"


async def test_set_roles_with_no_roles_removes_them(auth_server, auth_emulator, admin, user):
    auth_emulator.set_custom_claims(user.uid, {"roles": ["editor"]})

    reply = await set_roles(auth_server, admin.id_token, user.uid, [])
    identity = await who_am_i(auth_server, auth_emulator.refresh(user))

    assert list(reply.roles) == []
    assert list(identity.roles) == []
    assert "roles" not in identity.custom_claims


@pytest.mark.parametrize(
    ("roles", "field"),
    [
        (["Admin"], "roles[0]"),
        (["editor", "1st"], "roles[1]"),
        (["editor", ""], "roles[1]"),
        (["editor", "has space"], "roles[1]"),
        (["r" * 33], "roles[0]"),
        (["editor", "viewer", "editor"], "roles[2]"),
        ([f"role-{index}" for index in range(21)], "roles"),
    ],
    ids=["upper-case", "digit-first", "empty", "space", "too-long", "duplicate", "too-many"],
)
@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_set_roles_with_bad_roles_is_invalid(auth_server, admin, user, roles, field, protocol):
    with pytest.raises(RpcError) as raised:
        await set_roles(auth_server, admin.id_token, user.uid, roles, protocol)

    assert raised.value.code == "invalid_argument"
    assert list(raised.value.violations) == [field]


@pytest.mark.parametrize("uid", ["", "u" * 129], ids=["empty", "too-long"])
async def test_set_roles_with_bad_uid_is_invalid(auth_server, admin, uid):
    with pytest.raises(RpcError) as raised:
        await set_roles(auth_server, admin.id_token, uid, ["editor"])

    assert raised.value.code == "invalid_argument"
    assert list(raised.value.violations) == ["uid"]


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_set_roles_of_unknown_uid_is_not_found(auth_server, admin, protocol):
    with pytest.raises(RpcError) as raised:
        await set_roles(auth_server, admin.id_token, "no-such-user", ["editor"], protocol)

    assert raised.value.code == "not_found"
    assert raised.value.message == "user no-such-user not found"


async def test_admin_cannot_remove_own_admin_role(auth_server, auth_emulator, admin):
    with pytest.raises(RpcError) as raised:
        await set_roles(auth_server, admin.id_token, admin.uid, ["editor"])

    assert raised.value.code == "failed_precondition"
    assert raised.value.reason == "OWN_ADMIN_ROLE"
    assert list(token_claims(auth_emulator.refresh(admin))["roles"]) == ["admin"]


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_revoke_sessions_rejects_earlier_tokens(auth_server, auth_emulator, user, protocol):
    token = user.id_token
    wait_until_after(token_claims(token)["auth_time"])
    # A later token of the same session, which the server has not seen and so cannot have cached.
    # Emulator tokens are unsigned, so one issued in the same second would be the same string.
    unseen_token = auth_emulator.refresh(user)

    reply = await revoke_sessions(auth_server, token, protocol=protocol)

    assert reply.uid == user.uid
    assert abs(reply.revoke_time.seconds - time.time()) < 5
    with pytest.raises(RpcError) as raised:
        await who_am_i(auth_server, unseen_token, protocol)
    assert raised.value.code == "unauthenticated"
    assert raised.value.reason == "TOKEN_REVOKED"


async def test_revoke_sessions_rejects_tokens_refreshed_later(auth_server, auth_emulator, user):
    wait_until_after(token_claims(user.id_token)["auth_time"])
    await revoke_sessions(auth_server, user.id_token)

    with pytest.raises(RpcError) as raised:
        await who_am_i(auth_server, auth_emulator.refresh(user))

    assert raised.value.code == "unauthenticated"
    assert raised.value.reason == "TOKEN_REVOKED"


async def test_new_sign_in_after_revocation_works(auth_server, auth_emulator, user):
    wait_until_after(token_claims(user.id_token)["auth_time"])
    await revoke_sessions(auth_server, user.id_token)

    identity = await who_am_i(auth_server, auth_emulator.sign_in(user))

    assert identity.uid == user.uid


async def test_revoke_sessions_rejects_calling_token(auth_server, user):
    wait_until_after(token_claims(user.id_token)["auth_time"])
    await revoke_sessions(auth_server, user.id_token)

    with pytest.raises(RpcError) as raised:
        await who_am_i(auth_server, user.id_token)

    assert raised.value.code == "unauthenticated"


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_non_admin_revoking_other_user_is_denied(auth_server, auth_emulator, user, protocol):
    other = auth_emulator.sign_up()
    valid_since = auth_emulator.lookup(other.uid).get("validSince")

    with pytest.raises(RpcError) as raised:
        await revoke_sessions(auth_server, user.id_token, other.uid, protocol)

    assert raised.value.code == "permission_denied"
    assert auth_emulator.lookup(other.uid).get("validSince") == valid_since


async def test_admin_revokes_other_users_sessions(auth_server, auth_emulator, admin, user):
    unseen_token = auth_emulator.refresh(user)
    wait_until_after(token_claims(unseen_token)["auth_time"])

    reply = await revoke_sessions(auth_server, admin.id_token, user.uid)

    assert reply.uid == user.uid
    with pytest.raises(RpcError) as raised:
        await who_am_i(auth_server, unseen_token)
    assert raised.value.reason == "TOKEN_REVOKED"


async def test_revoke_sessions_of_unknown_uid_is_not_found(auth_server, admin):
    with pytest.raises(RpcError) as raised:
        await revoke_sessions(auth_server, admin.id_token, "no-such-user")

    assert raised.value.code == "not_found"


async def test_token_of_disabled_user_is_rejected(auth_server, auth_emulator, user):
    auth_emulator.set_disabled(user.uid)

    with pytest.raises(RpcError) as raised:
        await who_am_i(auth_server, user.id_token)

    assert raised.value.code == "unauthenticated"
    assert raised.value.reason == "USER_DISABLED"


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_set_roles_without_firebase_is_unavailable(server_without_firebase, admin, user, protocol):
    # The server trusts tokens of the running emulator, but its own emulator host refuses connections.
    started = time.monotonic()

    with pytest.raises(RpcError) as raised:
        await set_roles(server_without_firebase, admin.id_token, user.uid, ["editor"], protocol)

    assert raised.value.code == "unavailable"
    assert raised.value.message == "Firebase Auth is unavailable; retry later"
    assert time.monotonic() - started < 3.0
