"""UserService.DeleteMe on real servers in emulator mode: the Firebase user is disabled and its tokens rejected."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from functions.auth.v1 import auth_pb2
from functions.user.v1 import user_pb2

from tests.e2e.clients import Protocol, RpcError, call
from tests.servers import RunningServer, run_migrations, run_server
from tests.support.emulator import server_env
from tests.support.tcp_forwarder import TcpForwarder

pytestmark = pytest.mark.emulator

USERS = "functions.user.v1.UserService"
AUTH = "functions.auth.v1.AuthService"
MAIN_PROTOCOLS = [Protocol.CONNECT_JSON, Protocol.GRPC]
# The relay retries a failed event after 0.5, 1, 2 and 4 s at most, with jitter.
DISABLE_RETRY_WAIT_SECONDS = 15.0


@pytest.fixture(scope="module")
def users_server(auth_emulator, database_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A server with both services that checks every new token for revocation."""
    env = server_env(auth_emulator.host, database_path, ENABLED_SERVICES="auth,users", AUTH_CHECK_REVOKED="true")
    with run_server(env, tmp_path_factory.mktemp("users-server") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def unchecked_users_server(auth_emulator, database_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A server with both services that never checks with Firebase for revoked tokens."""
    env = server_env(auth_emulator.host, database_path, ENABLED_SERVICES="auth,users", AUTH_CHECK_REVOKED="false")
    with run_server(env, tmp_path_factory.mktemp("unchecked-users-server") / "server.log") as server:
        yield server


async def get_me(server, token: str, protocol: Protocol = Protocol.CONNECT_JSON) -> user_pb2.User:
    response = await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)
    return response.user


async def delete_me(server, token: str, protocol: Protocol = Protocol.CONNECT_JSON) -> user_pb2.DeleteMeResponse:
    return await call(protocol, server.address, USERS, "DeleteMe", user_pb2.DeleteMeRequest(), user_pb2.DeleteMeResponse, token=token)


async def who_am_i(server, token: str, protocol: Protocol = Protocol.CONNECT_JSON) -> auth_pb2.WhoAmIResponse:
    return await call(protocol, server.address, AUTH, "WhoAmI", auth_pb2.WhoAmIRequest(), auth_pb2.WhoAmIResponse, token=token)


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_delete_me_disables_firebase_user(users_server, auth_emulator, user, protocol):
    await get_me(users_server, user.id_token, protocol)

    reply = await delete_me(users_server, user.id_token, protocol)

    assert reply.uid == user.uid
    assert abs(reply.delete_time.seconds - time.time()) < 10
    assert auth_emulator.lookup(user.uid).get("disabled") is True


@pytest.mark.parametrize("protocol", MAIN_PROTOCOLS, ids=lambda protocol: protocol.value)
async def test_token_after_delete_me_is_rejected_everywhere(users_server, user, protocol):
    # The calls before DeleteMe put the token in the server's cache of verified tokens.
    await who_am_i(users_server, user.id_token, protocol)
    await delete_me(users_server, user.id_token, protocol)

    with pytest.raises(RpcError) as who_am_i_raised:
        await who_am_i(users_server, user.id_token, protocol)
    with pytest.raises(RpcError) as get_me_raised:
        await get_me(users_server, user.id_token, protocol)

    assert who_am_i_raised.value.code == "unauthenticated"
    assert who_am_i_raised.value.reason == "USER_DISABLED"
    assert get_me_raised.value.code == "unauthenticated"
    assert get_me_raised.value.reason == "USER_DISABLED"


async def test_deleted_user_cannot_refresh_token(users_server, auth_emulator, user):
    await delete_me(users_server, user.id_token)

    with pytest.raises(httpx.HTTPStatusError) as raised:
        auth_emulator.refresh(user)

    assert raised.value.response.status_code == 400
    assert "USER_DISABLED" in raised.value.response.text


async def test_repeated_delete_me_is_unauthenticated(unchecked_users_server, user):
    await delete_me(unchecked_users_server, user.id_token)

    with pytest.raises(RpcError) as raised:
        await delete_me(unchecked_users_server, user.id_token)

    assert (raised.value.code, raised.value.reason) == ("unauthenticated", "ACCOUNT_DELETED")


async def test_without_revocation_check_every_domain_rejects_token(unchecked_users_server, auth_emulator, user):
    """Without AUTH_CHECK_REVOKED, Firebase is never asked; the deleted profile alone refuses the token."""
    await delete_me(unchecked_users_server, user.id_token)

    rejections = {}
    for name, call_service in (("auth", who_am_i), ("users", get_me)):
        with pytest.raises(RpcError) as raised:
            await call_service(unchecked_users_server, user.id_token)
        rejections[name] = (raised.value.code, raised.value.reason)

    assert rejections["auth"] == ("unauthenticated", "ACCOUNT_DELETED")
    assert rejections["users"] == ("unauthenticated", "ACCOUNT_DELETED")
    assert auth_emulator.lookup(user.uid).get("disabled") is True


async def test_disable_retried_after_firebase_outage(auth_emulator, tmp_path):
    """DeleteMe succeeds while Firebase is cut off; the UserDeleted consumer disables the account once it is back.

    The server has a database of its own: the relays of other servers on a shared database could
    take the event and spend its attempts against their own Firebase settings.
    """
    forwarder = TcpForwarder("127.0.0.1", auth_emulator.port)
    env = server_env(forwarder.address, tmp_path / "outage.db", ENABLED_SERVICES="auth,users")
    run_migrations(env)
    user = auth_emulator.sign_up()
    with run_server(env, tmp_path / "server.log") as server:
        await get_me(server, user.id_token)

        deleted = await delete_me(server, user.id_token)
        disabled_during_outage = auth_emulator.lookup(user.uid).get("disabled")
        await forwarder.open()
        try:
            deadline = time.monotonic() + DISABLE_RETRY_WAIT_SECONDS
            while not auth_emulator.lookup(user.uid).get("disabled") and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        finally:
            await forwarder.close()
        log = server.log()

    assert deleted.uid == user.uid
    assert not disabled_during_outage
    assert auth_emulator.lookup(user.uid).get("disabled") is True
    assert "the users.disable_sign_in consumer retries" in log
