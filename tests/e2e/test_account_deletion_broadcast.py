"""Two real server processes on one Postgres database: a DeleteMe through one makes the other
reject the account's cached token at once, not after the one-minute recheck.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator

import pytest
from functions.auth.v1 import auth_pb2
from functions.user.v1 import user_pb2

from tests.databases import POSTGRES_MISSING, POSTGRES_URL_VARIABLE, postgres_database
from tests.e2e.clients import Protocol, RpcError, call
from tests.e2e.conftest import Tokens, server_env
from tests.servers import RunningServer, run_migrations, run_server

pytestmark = pytest.mark.skipif(not os.environ.get(POSTGRES_URL_VARIABLE), reason=POSTGRES_MISSING)

USERS = "functions.user.v1.UserService"
AUTH = "functions.auth.v1.AuthService"
# Far below the verifier's 60 s recheck, so only the broadcast can explain the rejection.
REJECTION_LIMIT_SECONDS = 5.0


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory, cert_server) -> Iterator[tuple[RunningServer, RunningServer]]:
    directory = tmp_path_factory.mktemp("deletion-broadcast")
    with postgres_database() as url:
        env = server_env(cert_server, url, DEV_KEYS_DIR=str(directory / "dev-keys"), ENABLED_SERVICES="auth,users")
        run_migrations(env)
        with run_server(env, directory / "a.log") as server_a, run_server(env, directory / "b.log") as server_b:
            yield server_a, server_b


async def who_am_i(server: RunningServer, token: str) -> auth_pb2.WhoAmIResponse:
    return await call(Protocol.CONNECT_JSON, server.address, AUTH, "WhoAmI", auth_pb2.WhoAmIRequest(), auth_pb2.WhoAmIResponse, token=token)


async def test_deletion_rejects_cached_token_elsewhere(two_servers, tokens: Tokens) -> None:
    server_a, server_b = two_servers
    uid = f"broadcast-{secrets.token_hex(6)}"
    token = tokens.mint(uid)
    await call(Protocol.CONNECT_JSON, server_a.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)
    # Server B verifies the token now and caches it for a minute.
    assert (await who_am_i(server_b, token)).uid == uid

    # DeleteMe fails on Firebase here (no credentials), after the deletion committed.
    with pytest.raises(RpcError):
        await call(Protocol.CONNECT_JSON, server_a.address, USERS, "DeleteMe", user_pb2.DeleteMeRequest(), user_pb2.DeleteMeResponse, token=token)
    started = time.monotonic()
    while True:
        try:
            await who_am_i(server_b, token)
        except RpcError as error:
            rejected = error
            break
        assert time.monotonic() - started < REJECTION_LIMIT_SECONDS, "server B still accepts the deleted account's token"

    assert (rejected.code, rejected.reason) == ("unauthenticated", "ACCOUNT_DELETED")
