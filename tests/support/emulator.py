"""The Firebase Auth emulator from node_modules, run for tests, and its REST API for making users.

    with run_auth_emulator(TEST_PROJECT_ID, tmp_path) as emulator:
        user = emulator.sign_up()                  # a new email/password user with an ID token
        emulator.set_custom_claims(user.uid, {"roles": ["admin"]})
        token = emulator.refresh(user)             # a new ID token carrying the claims

The emulator is `firebase emulators:start --only auth` with a firebase.json written to a
temporary directory: the Auth, hub and logging ports are free ports on 127.0.0.1, and the UI is
off. A project id that starts with `demo-` keeps firebase-tools offline, without a login. The
process runs in its own process group, which `stop` signals by id.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.servers import ROOT, free_port

# A `demo-` project id keeps firebase-tools offline.
TEST_PROJECT_ID = "demo-functions-auth"
FIREBASE_CLI = ROOT / "node_modules" / ".bin" / "firebase"
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
# The emulator accepts any API key, and this bearer token as an admin credential.
API_KEY = "fake"
ADMIN_TOKEN = "owner"
DEFAULT_PASSWORD = "correct-horse-battery"


@dataclass
class EmulatorUser:
    """A user of the emulator with their credentials and latest tokens."""

    uid: str
    email: str
    password: str
    id_token: str
    refresh_token: str


@dataclass
class AuthEmulator:
    """A running Auth emulator for one project."""

    process: subprocess.Popen
    port: int
    project_id: str
    log_path: Path

    @property
    def host(self) -> str:
        """Return host:port, the value for FIREBASE_AUTH_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sign_up(self, email: str | None = None, password: str = DEFAULT_PASSWORD) -> EmulatorUser:
        """Create an email/password user, signed in; the email is random unless given."""
        email = email or f"user-{secrets.token_hex(6)}@example.com"
        body = self._post("/identitytoolkit.googleapis.com/v1/accounts:signUp", {
            "email": email, "password": password, "returnSecureToken": True,
        })
        return EmulatorUser(body["localId"], email, password, body["idToken"], body["refreshToken"])

    def sign_in(self, user: EmulatorUser) -> str:
        """Sign the user in with their password again; store and return the new ID token."""
        body = self._post("/identitytoolkit.googleapis.com/v1/accounts:signInWithPassword", {
            "email": user.email, "password": user.password, "returnSecureToken": True,
        })
        user.id_token = body["idToken"]
        user.refresh_token = body["refreshToken"]
        return user.id_token

    def refresh(self, user: EmulatorUser) -> str:
        """Exchange the user's refresh token for a new ID token, which carries the current claims."""
        response = httpx.post(
            f"{self.url}/securetoken.googleapis.com/v1/token",
            params={"key": API_KEY},
            data={"grant_type": "refresh_token", "refresh_token": user.refresh_token},
            timeout=10,
        )
        response.raise_for_status()
        body = response.json()
        user.id_token = body["id_token"]
        user.refresh_token = body["refresh_token"]
        return user.id_token

    def set_custom_claims(self, uid: str, claims: dict[str, Any]) -> None:
        """Replace the user's custom claims, as an admin."""
        self._update(uid, {"customAttributes": json.dumps(claims)})

    def set_disabled(self, uid: str, disabled: bool = True) -> None:
        """Disable or enable the user's account, as an admin."""
        self._update(uid, {"disableUser": disabled})

    def lookup(self, uid: str) -> dict[str, Any]:
        """Return the emulator's user record, as an admin."""
        body = self._post(
            f"/identitytoolkit.googleapis.com/v1/projects/{self.project_id}/accounts:lookup",
            {"localId": [uid]},
            admin=True,
        )
        return body["users"][0]

    def stop(self) -> int:
        """Stop the emulator's process group and wait; return the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def _update(self, uid: str, changes: dict[str, Any]) -> None:
        self._post(
            f"/identitytoolkit.googleapis.com/v1/projects/{self.project_id}/accounts:update",
            {"localId": uid, **changes},
            admin=True,
        )

    def _post(self, path: str, body: dict[str, Any], *, admin: bool = False) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"} if admin else {}
        response = httpx.post(f"{self.url}{path}", params={"key": API_KEY}, json=body, headers=headers, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"Auth emulator returned HTTP {response.status_code} for {path}: {response.text}")
        return response.json()


def server_env(emulator_host: str, database_path: Path, **extra: str) -> dict[str, str]:
    """Return the environment of a test server in emulator mode, serving the auth domain."""
    return {
        "DATABASE_URL": f"sqlite+aiosqlite:///{database_path}",
        "FIREBASE_PROJECT_ID": TEST_PROJECT_ID,
        "FIREBASE_AUTH_EMULATOR_HOST": emulator_host,
        "FIREBASE_CERTS_URL": "",
        "ENABLED_SERVICES": "auth",
        **extra,
    }


def is_installed() -> bool:
    """Return whether firebase-tools is installed in node_modules."""
    return FIREBASE_CLI.exists()


def start_auth_emulator(project_id: str, directory: Path) -> AuthEmulator:
    """Start the Auth emulator with its configuration and log in directory; wait until it responds.

    Raises:
        RuntimeError: when the emulator exits or does not respond within STARTUP_TIMEOUT_SECONDS.
    """
    port = free_port()
    config = {
        "emulators": {
            "auth": {"host": "127.0.0.1", "port": port},
            "hub": {"host": "127.0.0.1", "port": free_port()},
            "logging": {"host": "127.0.0.1", "port": free_port()},
            "ui": {"enabled": False},
            "singleProjectMode": True,
        }
    }
    (directory / "firebase.json").write_text(json.dumps(config, indent=2))
    log_path = directory / "emulator.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(FIREBASE_CLI), "emulators:start", "--only", "auth", "--project", project_id],
            cwd=directory,
            # CI=true turns off prompts and update checks.
            env={**os.environ, "CI": "true"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    emulator = AuthEmulator(process, port, project_id, log_path)

    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Auth emulator exited with {process.returncode} during startup:\n{emulator.log()}")
        if _is_ready(emulator.url):
            return emulator
        time.sleep(0.1)
    emulator.stop()
    raise RuntimeError(f"Auth emulator did not respond within {STARTUP_TIMEOUT_SECONDS} s:\n{emulator.log()}")


@contextlib.contextmanager
def run_auth_emulator(project_id: str, directory: Path) -> Iterator[AuthEmulator]:
    """Run the Auth emulator for the duration of the block."""
    emulator = start_auth_emulator(project_id, directory)
    try:
        yield emulator
    finally:
        emulator.stop()


def token_claims(token: str) -> dict[str, Any]:
    """Return the claims of an ID token without verifying it."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def wait_until_after(seconds: int) -> None:
    """Sleep until the clock has passed the whole second `seconds` since the epoch.

    Firebase stores revocation times in whole seconds, and a token authenticated in the same
    second as a revocation stays valid, so a test revokes only after its token's auth_time.
    """
    remaining = seconds + 1 - time.time()
    if remaining > 0:
        time.sleep(remaining)


def _is_ready(url: str) -> bool:
    try:
        response = httpx.get(f"{url}/", timeout=1.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json().get("authEmulator", {}).get("ready") is True
