"""A real server on a loopback socket per database backend, and tokens it accepts.

Tokens are Firebase-shaped RS256 tokens signed with a key generated here. The server fetches
the matching certificate from a loopback HTTP server, as it fetches Google's in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.databases import BACKENDS, database_url
from tests.servers import RunningServer, run_migrations, run_server
from tests.support import (
    CertificateServer,
    certs_document,
    firebase_claims,
    rsa_key,
    sign_rs256,
)

PROJECT_ID = "functions-e2e"
KEY_ID = "e2e-key"
ALLOWED_ORIGIN = "https://app.example"


@dataclass
class Tokens:
    """Mint ID tokens the test server accepts."""

    key: Any

    def mint(self, uid: str, *, email: str | None = None, roles: list[str] | None = None, **claims: Any) -> str:
        email = email if email is not None else f"{uid}@example.com"
        values = firebase_claims(project_id=PROJECT_ID, uid=uid, email=email, **claims)
        if roles is not None:
            values["roles"] = roles
        return sign_rs256(values, self.key, kid=KEY_ID)


@pytest.fixture(scope="session")
def signing_key():
    return rsa_key("e2e-signing")


@pytest.fixture(scope="session")
def cert_server(signing_key) -> Iterator[CertificateServer]:
    with CertificateServer(certs_document({KEY_ID: signing_key}), max_age=3600) as server:
        yield server


@pytest.fixture(scope="session")
def tokens(signing_key) -> Tokens:
    return Tokens(signing_key)


def server_env(cert_server: CertificateServer, url: str, **extra: str) -> dict[str, str]:
    """Return the environment of a test server using the given database."""
    return {
        "DATABASE_URL": url,
        "FIREBASE_PROJECT_ID": PROJECT_ID,
        "FIREBASE_CERTS_URL": cert_server.url,
        "FIREBASE_AUTH_EMULATOR_HOST": "",
        "CORS_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
        "ENABLED_SERVICES": "auth,users",
        **extra,
    }


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def server(backend, tmp_path_factory, cert_server) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp(f"server-{backend}")
    with database_url(backend, directory) as url:
        env = server_env(cert_server, url, DEV_KEYS_DIR=str(directory / "dev-keys"))
        run_migrations(env)
        with run_server(env, directory / "server.log") as running:
            yield running
