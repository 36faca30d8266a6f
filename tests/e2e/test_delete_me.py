"""UserService.DeleteMe through a real server, over Connect JSON and gRPC, on every database backend.

This server has no Firebase Admin credentials, so DeleteMe deletes the profile and then fails
with failed_precondition because the Firebase account could not be disabled. The Firebase side
needs the Auth emulator and is tested with it under tests/e2e/auth.
"""

from __future__ import annotations

import uuid

import pytest
from functions.user.v1 import user_pb2
from google.protobuf import field_mask_pb2

from app.platform.auth import ensure_dev_keys, mint_token
from app.settings import DEV_PROJECT_ID
from tests.e2e.clients import Protocol, RpcError, call
from tests.servers import run_migrations, run_server

USERS = "functions.user.v1.UserService"
MAIN_PROTOCOLS = [Protocol.CONNECT_JSON, Protocol.GRPC]


def new_uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=MAIN_PROTOCOLS, ids=lambda p: p.value)
def protocol(request) -> Protocol:
    return request.param


async def get_me(protocol, server, token) -> user_pb2.User:
    response = await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)
    return response.user


async def delete_me(protocol, server, token, etag: str = "") -> RpcError:
    """Call DeleteMe and return the error it ends with here: the Firebase one, or unauthenticated once deleted."""
    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "DeleteMe", user_pb2.DeleteMeRequest(etag=etag), user_pb2.DeleteMeResponse, token=token)
    return raised.value


async def rpc_error(protocol, server, token, method: str, request, response_type) -> RpcError:
    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, method, request, response_type, token=token)
    return raised.value


async def test_delete_me_without_firebase_deletes_and_fails(protocol, server, tokens) -> None:
    uid = new_uid("delete")
    token = tokens.mint(uid, name="Ada")
    await get_me(protocol, server, token)

    first = await delete_me(protocol, server, token)
    second = await delete_me(protocol, server, token)

    assert first.code == "failed_precondition"
    assert first.message.startswith(f"user {uid} is deleted, but its Firebase account is not disabled")
    assert (second.code, second.reason) == ("unauthenticated", "ACCOUNT_DELETED")


async def test_calls_after_delete_me_are_unauthenticated(protocol, server, tokens) -> None:
    uid = new_uid("deleted")
    token = tokens.mint(uid)
    await get_me(protocol, server, token)
    await delete_me(protocol, server, token)
    update = user_pb2.UpdateMeRequest(user=user_pb2.User(bio="back"), update_mask=field_mask_pb2.FieldMask(paths=["bio"]))

    get_me_error = await rpc_error(protocol, server, token, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse)
    update_error = await rpc_error(protocol, server, token, "UpdateMe", update, user_pb2.UpdateMeResponse)
    get_user_error = await rpc_error(protocol, server, token, "GetUser", user_pb2.GetUserRequest(), user_pb2.GetUserResponse)
    # A fresh token of the same uid does not create the profile again either.
    fresh_token_error = await rpc_error(protocol, server, tokens.mint(uid, name="Again"), "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse)

    for error in (get_me_error, update_error, get_user_error, fresh_token_error):
        assert error.code == "unauthenticated"
        assert error.reason == "ACCOUNT_DELETED"


async def test_deleted_user_is_hidden_from_admins(protocol, server, tokens) -> None:
    prefix = f"hidden{uuid.uuid4().hex[:6]}"
    remaining, deleted = f"{prefix}-a", f"{prefix}-b"
    for uid in (remaining, deleted):
        await get_me(protocol, server, tokens.mint(uid, email=f"{uid}@example.com"))
    await delete_me(protocol, server, tokens.mint(deleted, email=f"{deleted}@example.com"))
    admin = tokens.mint(new_uid("admin"), roles=["admin"])

    get_user_error = await rpc_error(protocol, server, admin, "GetUser", user_pb2.GetUserRequest(uid=deleted), user_pb2.GetUserResponse)
    page = await call(protocol, server.address, USERS, "ListUsers", user_pb2.ListUsersRequest(email_prefix=prefix), user_pb2.ListUsersResponse, token=admin)

    assert get_user_error.code == "not_found"
    assert [user.uid for user in page.users] == [remaining]


async def test_delete_me_with_stale_etag_is_aborted(protocol, server, tokens) -> None:
    token = tokens.mint(new_uid("stale"))
    stale = await get_me(protocol, server, token)
    update = user_pb2.UpdateMeRequest(user=user_pb2.User(bio="newer"), update_mask=field_mask_pb2.FieldMask(paths=["bio"]))
    await call(protocol, server.address, USERS, "UpdateMe", update, user_pb2.UpdateMeResponse, token=token)

    error = await delete_me(protocol, server, token, etag=stale.etag)
    current = await get_me(protocol, server, token)

    assert error.code == "aborted"
    assert current.bio == "newer"


async def test_delete_me_without_token_is_unauthenticated(protocol, server) -> None:
    error = await delete_me(protocol, server, None)

    assert error.code == "unauthenticated"


async def test_delete_me_with_development_keys_succeeds(tmp_path) -> None:
    """With development keys, as `make run` signs users in, there is no Firebase account to disable."""
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}",
        "DEV_KEYS_DIR": str(tmp_path / "dev-keys"),
        "FIREBASE_CERTS_URL": "",
        "FIREBASE_AUTH_EMULATOR_HOST": "",
        "ENABLED_SERVICES": "auth,users",
    }
    run_migrations(env)
    token = mint_token(ensure_dev_keys(tmp_path / "dev-keys"), project_id=DEV_PROJECT_ID, uid=new_uid("dev"))
    with run_server(env, tmp_path / "server.log") as server:
        await get_me(Protocol.CONNECT_JSON, server, token)
        reply = await call(
            Protocol.CONNECT_JSON, server.address, USERS, "DeleteMe", user_pb2.DeleteMeRequest(), user_pb2.DeleteMeResponse, token=token
        )
        after = await rpc_error(Protocol.CONNECT_JSON, server, token, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse)

    assert reply.HasField("delete_time")
    assert (after.code, after.reason) == ("unauthenticated", "ACCOUNT_DELETED")
