"""FirebaseAdmin against the real Auth emulator, in this process: users, roles, revocation, outages."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from app.platform.auth import FirebaseTokenVerifier, TokenRejected
from app.platform.context import Principal
from app.platform.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from app.platform.firebase import EMULATOR_HOST_VARIABLE, FirebaseAdmin
from app.settings import Settings
from tests.servers import free_port
from tests.support.emulator import TEST_PROJECT_ID as PROJECT_ID
from tests.support.emulator import token_claims, wait_until_after

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module")
def firebase(auth_emulator) -> Iterator[FirebaseAdmin]:
    admin = FirebaseAdmin(project_id=PROJECT_ID, emulator_host=auth_emulator.host)
    yield admin
    admin.close()


def verifier_for(firebase: FirebaseAdmin) -> FirebaseTokenVerifier:
    """Return an emulator-mode verifier that checks revocation through the adapter, without a cache."""
    return FirebaseTokenVerifier(
        project_id=PROJECT_ID, certificates=None, emulator=True, cache_size=0, revocation_checker=firebase.check_revoked
    )


class SilentServer:
    """A loopback port that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._connections: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()
        for connection in self._connections:
            connection.close()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                self._connections.append(self._listener.accept()[0])
            except TimeoutError:
                continue


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


async def test_get_user_returns_emulator_user(firebase, user):
    found = await firebase.get_user(user.uid)

    assert found.uid == user.uid
    assert found.email == user.email
    assert found.disabled is False
    assert found.custom_claims == {}


async def test_get_user_of_unknown_uid_is_not_found(firebase):
    with pytest.raises(NotFound) as raised:
        await firebase.get_user("no-such-user")

    assert raised.value.message == "user no-such-user not found"


async def test_set_roles_keeps_other_claims(firebase, auth_emulator, user):
    auth_emulator.set_custom_claims(user.uid, {"tier": "gold", "roles": ["old"]})

    stored = await firebase.set_roles(user.uid, ["editor", "viewer"])

    assert stored == ["editor", "viewer"]
    assert (await firebase.get_user(user.uid)).custom_claims == {"tier": "gold", "roles": ["editor", "viewer"]}


async def test_set_roles_with_no_roles_removes_claim(firebase, auth_emulator, user):
    auth_emulator.set_custom_claims(user.uid, {"tier": "gold", "roles": ["editor"]})

    stored = await firebase.set_roles(user.uid, [])

    assert stored == []
    assert (await firebase.get_user(user.uid)).custom_claims == {"tier": "gold"}


async def test_set_roles_beyond_claims_limit_is_invalid(firebase, auth_emulator, user):
    auth_emulator.set_custom_claims(user.uid, {"note": "x" * 950})

    with pytest.raises(InvalidInput) as raised:
        await firebase.set_roles(user.uid, ["editor", "viewer", "auditor"])

    assert [violation.field for violation in raised.value.violations] == ["roles"]
    assert (await firebase.get_user(user.uid)).custom_claims == {"note": "x" * 950}


async def test_set_roles_of_unknown_uid_is_not_found(firebase):
    with pytest.raises(NotFound):
        await firebase.set_roles("no-such-user", ["editor"])


async def test_revoke_sessions_returns_revoke_time(firebase, user):
    wait_until_after(token_claims(user.id_token)["auth_time"])
    before = int(time.time())

    revoke_time = await firebase.revoke_sessions(user.uid)

    assert before <= revoke_time.timestamp() <= time.time()
    assert (await firebase.get_user(user.uid)).tokens_valid_after_ms == int(revoke_time.timestamp()) * 1000


async def test_revoked_token_is_rejected(firebase, user):
    verifier = verifier_for(firebase)
    old_token = user.id_token
    assert (await verifier.verify(old_token)).uid == user.uid
    wait_until_after(token_claims(old_token)["auth_time"])

    await firebase.revoke_sessions(user.uid)

    with pytest.raises(TokenRejected) as raised:
        await verifier.verify(old_token)
    assert raised.value.reason == "TOKEN_REVOKED"


async def test_token_refreshed_after_revocation_is_rejected(firebase, auth_emulator, user):
    # The emulator keeps refresh tokens working after a revocation; the refreshed ID token keeps
    # the old auth_time, and that is what the check compares.
    verifier = verifier_for(firebase)
    wait_until_after(token_claims(user.id_token)["auth_time"])
    await firebase.revoke_sessions(user.uid)

    refreshed = auth_emulator.refresh(user)

    with pytest.raises(TokenRejected) as raised:
        await verifier.verify(refreshed)
    assert raised.value.reason == "TOKEN_REVOKED"


async def test_token_of_new_sign_in_is_accepted(firebase, auth_emulator, user):
    verifier = verifier_for(firebase)
    wait_until_after(token_claims(user.id_token)["auth_time"])
    await firebase.revoke_sessions(user.uid)

    new_token = auth_emulator.sign_in(user)

    assert (await verifier.verify(new_token)).uid == user.uid


async def test_token_of_disabled_user_is_rejected(firebase, auth_emulator, user):
    auth_emulator.set_disabled(user.uid)

    with pytest.raises(TokenRejected) as raised:
        await verifier_for(firebase).verify(user.id_token)

    assert raised.value.reason == "USER_DISABLED"


async def test_token_of_deleted_user_is_rejected(firebase):
    principal = Principal(uid="deleted-user", auth_time=int(time.time()))

    with pytest.raises(TokenRejected) as raised:
        await firebase.check_revoked(principal)

    assert raised.value.reason == "USER_NOT_FOUND"


async def test_closed_port_is_unavailable_quickly():
    firebase = FirebaseAdmin(project_id=PROJECT_ID, emulator_host=f"127.0.0.1:{free_port()}")
    started = time.monotonic()

    with pytest.raises(Unavailable) as raised:
        await firebase.set_roles("some-user", ["editor"])

    assert time.monotonic() - started < 3.0
    assert raised.value.message == "Firebase Auth is unavailable; retry later"
    firebase.close()


async def test_silent_server_is_unavailable_after_timeout(silent_server):
    firebase = FirebaseAdmin(project_id=PROJECT_ID, emulator_host=silent_server.host, timeout_seconds=0.5)
    started = time.monotonic()

    with pytest.raises(Unavailable):
        await firebase.get_user("some-user")

    assert time.monotonic() - started < 1.5
    firebase.close()


async def test_calls_beyond_concurrency_limit_fail_at_deadline(silent_server):
    firebase = FirebaseAdmin(project_id=PROJECT_ID, emulator_host=silent_server.host, timeout_seconds=0.5, max_concurrency=1)
    started = time.monotonic()

    outcomes = await asyncio.gather(*(firebase.get_user(f"user-{index}") for index in range(4)), return_exceptions=True)

    assert [type(outcome) for outcome in outcomes] == [Unavailable] * 4
    assert time.monotonic() - started < 1.5
    # One thread ran: its first request, and at most the SDK's one retry after the read timeout.
    assert silent_server.connection_count <= 2
    firebase.close()


async def test_missing_credentials_fail_with_failed_precondition(monkeypatch, tmp_path):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    # No gcloud configuration and no metadata server probe, so only a credentials file could help.
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    # The environment names an emulator and the adapter's settings do not: the settings win.
    monkeypatch.setenv(EMULATOR_HOST_VARIABLE, "127.0.0.1:1")
    firebase = FirebaseAdmin(project_id=PROJECT_ID)

    with pytest.raises(FailedPrecondition) as raised:
        await firebase.get_user("some-user")

    assert "GOOGLE_APPLICATION_CREDENTIALS" in raised.value.message
    firebase.close()


def test_from_settings_uses_emulator_host_setting():
    settings = Settings(app_env="test", firebase_project_id=PROJECT_ID, firebase_auth_emulator_host="127.0.0.1:9099")

    firebase = FirebaseAdmin.from_settings(settings)

    assert firebase.project_id == PROJECT_ID
    assert firebase.emulator_host == "127.0.0.1:9099"
    firebase.close()


@pytest.mark.parametrize("host", ["http://127.0.0.1:9099", "127.0.0.1", "127.0.0.1:port"])
def test_malformed_emulator_host_is_rejected(host):
    with pytest.raises(ValueError, match="FIREBASE_AUTH_EMULATOR_HOST must be host:port"):
        FirebaseAdmin(project_id=PROJECT_ID, emulator_host=host)
