"""Our verifier and firebase-admin's verify_id_token reach the same verdicts on the same tokens.

Both fetch the same certificates from a loopback HTTP server and use the same clock skew. The
cases where we are stricter on purpose (auth_time, time claims of emulator tokens) are asserted
as differences.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import firebase_admin
import pytest
from firebase_admin import _token_gen, credentials
from firebase_admin import auth as firebase_auth
from google.auth.credentials import AnonymousCredentials

from app.platform.auth import CertificateSource, FirebaseTokenVerifier, TokenRejected
from tests.support import (
    CLOCK_SKEW_SECONDS,
    TOKEN_CASES,
    CertificateServer,
    TokenCase,
    TokenMaker,
    certs_document,
    rsa_key,
    unsigned_token,
)

PROJECT_ID = "functions-differential"
KID = "key-1"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}

COMPARED_CASES = [case for case in TOKEN_CASES if case.firebase_admin_comparable and case.firebase_admin_agrees]


class OfflineCredential(credentials.Base):
    """A credential that never calls Google: verifying ID tokens needs only the project id."""

    def get_credential(self) -> AnonymousCredentials:
        return AnonymousCredentials()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any socket connection that leaves the machine."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK_HOSTS:
            raise OSError(f"test tried to connect to {address[0]}: only loopback is allowed")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def maker() -> TokenMaker:
    return TokenMaker(PROJECT_ID, KID, rsa_key("signing"), rsa_key("other"), int(time.time()))


@pytest.fixture
def cert_server() -> Iterator[CertificateServer]:
    with CertificateServer(certs_document({KID: rsa_key("signing")}), max_age=3600) as server:
        yield server


@pytest.fixture
def firebase_app(cert_server: CertificateServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[firebase_admin.App]:
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    # TokenVerifier reads the certificate URL from this constant when an app's auth client is created.
    monkeypatch.setattr(_token_gen, "ID_TOKEN_CERT_URI", cert_server.url)
    app = firebase_admin.initialize_app(
        OfflineCredential(), options={"projectId": PROJECT_ID}, name=f"differential-{secrets.token_hex(4)}"
    )
    yield app
    firebase_admin.delete_app(app)


@pytest.fixture
async def verifier(cert_server: CertificateServer) -> AsyncIterator[FirebaseTokenVerifier]:
    source = CertificateSource(cert_server.url, timeout_seconds=2.0)
    yield FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=source, clock_skew_seconds=CLOCK_SKEW_SECONDS)
    await source.aclose()


async def our_claims(verifier: FirebaseTokenVerifier, token: str) -> dict[str, Any] | None:
    """Return the claims our verifier accepts, or None when it rejects the token."""
    try:
        principal = await verifier.verify(token)
    except TokenRejected:
        return None
    return principal.claims


async def firebase_admin_claims(app: firebase_admin.App, token: str) -> dict[str, Any] | None:
    """Return the claims firebase-admin accepts, or None when it rejects the token."""

    def verify() -> dict[str, Any] | None:
        try:
            claims = firebase_auth.verify_id_token(token, app=app, clock_skew_seconds=CLOCK_SKEW_SECONDS)
        # firebase-admin raises ValueError, not InvalidIdTokenError, for an empty token.
        except (firebase_auth.InvalidIdTokenError, ValueError):
            return None
        claims.pop("uid")
        return claims

    return await asyncio.to_thread(verify)


def case_named(name: str) -> TokenCase:
    return next(case for case in TOKEN_CASES if case.name == name)


@pytest.mark.parametrize("case", COMPARED_CASES, ids=lambda case: case.name)
async def test_same_verdict_as_firebase_admin(
    case: TokenCase, maker: TokenMaker, verifier: FirebaseTokenVerifier, firebase_app: firebase_admin.App
) -> None:
    token = case.build(maker)

    ours = await our_claims(verifier, token)
    theirs = await firebase_admin_claims(firebase_app, token)

    assert (ours is not None) == (case.reason is None)
    assert ours == theirs


def test_matrix_covers_required_cases() -> None:
    required = {
        "good",
        "expired",
        "future iat",
        "future auth_time",
        "wrong aud",
        "wrong iss",
        "empty sub",
        "sub of 129 characters",
        "no kid",
        "unknown kid",
        "signed with another key",
        "alg none",
        "HS256 with the public key as secret",
        "garbage",
        "missing exp",
    }

    assert required <= {case.name for case in TOKEN_CASES}
    assert len(COMPARED_CASES) >= 14


@pytest.mark.parametrize("name", ["future auth_time", "missing auth_time"])
async def test_auth_time_checked_only_by_us(
    name: str, maker: TokenMaker, verifier: FirebaseTokenVerifier, firebase_app: firebase_admin.App
) -> None:
    token = case_named(name).build(maker)

    ours = await our_claims(verifier, token)
    theirs = await firebase_admin_claims(firebase_app, token)

    assert ours is None
    assert theirs is not None


async def test_exp_nan_rejected_only_by_us(
    maker: TokenMaker, verifier: FirebaseTokenVerifier, firebase_app: firebase_admin.App
) -> None:
    token = maker.signed(maker.claims(exp=float("nan")))

    ours = await our_claims(verifier, token)
    theirs = await firebase_admin_claims(firebase_app, token)

    assert ours is None
    assert theirs is not None


async def test_firebase_admin_fetched_from_loopback(
    maker: TokenMaker, cert_server: CertificateServer, firebase_app: firebase_admin.App
) -> None:
    claims = await firebase_admin_claims(firebase_app, maker.signed())

    assert claims is not None
    assert cert_server.request_count == 1


@pytest.fixture
def emulated_firebase_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[firebase_admin.App]:
    # verify_id_token without check_revoked never contacts the emulator, so nothing listens here.
    monkeypatch.setenv("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9099")
    app = firebase_admin.initialize_app(
        OfflineCredential(), options={"projectId": PROJECT_ID}, name=f"emulated-{secrets.token_hex(4)}"
    )
    yield app
    firebase_admin.delete_app(app)


async def test_emulator_tokens_accepted_like_firebase_admin(
    maker: TokenMaker, emulated_firebase_app: firebase_admin.App
) -> None:
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=None, emulator=True)
    token = unsigned_token(maker.claims(uid="emulated"))

    ours = await our_claims(verifier, token)
    theirs = await firebase_admin_claims(emulated_firebase_app, token)

    assert ours is not None
    assert ours == theirs


async def test_emulator_expiry_checked_only_by_us(maker: TokenMaker, emulated_firebase_app: firebase_admin.App) -> None:
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=None, emulator=True)
    token = unsigned_token(maker.claims(iat=maker.now - 3600, exp=maker.now - 10))

    ours = await our_claims(verifier, token)
    theirs = await firebase_admin_claims(emulated_firebase_app, token)

    assert ours is None
    assert theirs is not None
