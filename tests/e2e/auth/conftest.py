"""The Firebase Auth emulator for the session, and a real server that trusts it.

The emulator starts once per session (about 3 s). Tests make their own users, so they never
depend on each other's accounts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import RunningServer, free_port, run_migrations, run_server
from tests.support.emulator import (
    TEST_PROJECT_ID,
    AuthEmulator,
    EmulatorUser,
    is_installed,
    run_auth_emulator,
    server_env,
)


@pytest.fixture(scope="session")
def auth_emulator(tmp_path_factory) -> Iterator[AuthEmulator]:
    if not is_installed():
        pytest.skip("firebase-tools is not installed in node_modules: run `CI=true npm ci --omit=optional`")
    with run_auth_emulator(TEST_PROJECT_ID, tmp_path_factory.mktemp("auth-emulator")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def database_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth-database") / "auth.db"
    run_migrations(server_env("", path))
    return path


@pytest.fixture(scope="session")
def auth_server(auth_emulator, database_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A server in emulator mode that checks every new token for revocation."""
    env = server_env(auth_emulator.host, database_path, AUTH_CHECK_REVOKED="true")
    with run_server(env, tmp_path_factory.mktemp("auth-server") / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def server_without_firebase(database_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A server in emulator mode whose emulator host refuses connections, as if Firebase Auth were down."""
    env = server_env(f"127.0.0.1:{free_port()}", database_path)
    with run_server(env, tmp_path_factory.mktemp("server-without-firebase") / "server.log") as server:
        yield server


@pytest.fixture
def user(auth_emulator) -> EmulatorUser:
    """A new signed-in user without custom claims."""
    return auth_emulator.sign_up()


@pytest.fixture
def admin(auth_emulator) -> EmulatorUser:
    """A new signed-in user whose ID token carries the admin role."""
    account = auth_emulator.sign_up()
    auth_emulator.set_custom_claims(account.uid, {"roles": ["admin"]})
    auth_emulator.refresh(account)
    return account

