"""FirebaseTokenVerifier and CertificateSource against certificates served over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from app.platform.auth import (
    CertificateSource,
    CertificatesUnavailable,
    FirebaseTokenVerifier,
    TokenRejected,
    ensure_dev_keys,
    mint_token,
)
from app.platform.auth import tokens as tokens_module
from app.platform.auth.tokens import format_time
from app.platform.context import Principal
from tests.support import (
    CLOCK_SKEW_SECONDS,
    TOKEN_CASES,
    CertificateServer,
    FakeClock,
    TokenCase,
    TokenMaker,
    certs_document,
    rsa_key,
    sign_rs256,
    unsigned_token,
    unused_loopback_url,
)

PROJECT_ID = "functions-test"
KID = "key-1"
VERIFIER_REASONS = {
    "MALFORMED_TOKEN",
    "UNSUPPORTED_ALGORITHM",
    "UNKNOWN_KID",
    "BAD_SIGNATURE",
    "MISSING_CLAIM",
    "WRONG_AUDIENCE",
    "WRONG_ISSUER",
    "BAD_SUBJECT",
    "TOKEN_EXPIRED",
    "TOKEN_NOT_YET_VALID",
}


@pytest.fixture
def maker() -> TokenMaker:
    return TokenMaker(PROJECT_ID, KID, rsa_key("signing"), rsa_key("other"), int(time.time()))


@pytest.fixture
def cert_server() -> Iterator[CertificateServer]:
    with CertificateServer(certs_document({KID: rsa_key("signing")}), max_age=3600) as server:
        yield server


@pytest.fixture
def source_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def certificates(cert_server: CertificateServer, source_clock: FakeClock) -> AsyncIterator[CertificateSource]:
    source = CertificateSource(cert_server.url, timeout_seconds=1.0, clock=source_clock)
    yield source
    await source.aclose()


@pytest.fixture
def verifier_clock(maker: TokenMaker) -> FakeClock:
    return FakeClock(maker.now)


@pytest.fixture
def verifier(certificates: CertificateSource, verifier_clock: FakeClock) -> FirebaseTokenVerifier:
    return FirebaseTokenVerifier(
        project_id=PROJECT_ID,
        certificates=certificates,
        clock_skew_seconds=CLOCK_SKEW_SECONDS,
        clock=verifier_clock,
    )


def token_for(maker: TokenMaker, uid: str) -> str:
    return maker.signed(maker.claims(uid=uid))


async def reason_of(verifier: FirebaseTokenVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)
    return caught.value.reason


# Verdicts for every token of the shared table.


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda case: case.name)
async def test_token_case(case: TokenCase, verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    token = case.build(maker)

    if case.reason is None:
        principal = await verifier.verify(token)
        assert isinstance(principal, Principal)
        assert principal.uid == principal.claims["sub"]
        return

    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)
    assert caught.value.reason == case.reason
    if len(token) > 20:
        assert token not in caught.value.message


@pytest.mark.parametrize("claim", ["exp", "iat", "auth_time"])
@pytest.mark.parametrize("raw_value", ["1e309", "-1e309", "1e300", "-5", "253402300800"])
async def test_out_of_range_time_is_malformed(verifier: FirebaseTokenVerifier, maker: TokenMaker, claim: str, raw_value: str) -> None:
    # Written into the JSON by hand: 1e309 is a valid JSON number that Python reads as infinity.
    marker = 4242424242
    claims = maker.claims(**{claim: marker})
    header, payload, _ = maker.signed(claims).split(".")
    decoded = base64.urlsafe_b64decode(payload + "==").replace(str(marker).encode(), raw_value.encode())
    forged_payload = base64.urlsafe_b64encode(decoded).rstrip(b"=").decode()
    signing_input = f"{header}.{forged_payload}".encode()
    signature = maker.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    token = f"{header}.{forged_payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"

    assert await reason_of(verifier, token) == "MALFORMED_TOKEN"


async def test_mutated_tokens_raise_only_rejections(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    token = maker.signed()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00"
    generator = random.Random(20261204)
    outcomes: set[str] = set()

    for _ in range(300):
        characters = list(token)
        for _ in range(generator.randint(1, 4)):
            characters[generator.randrange(len(characters))] = generator.choice(alphabet)
        try:
            await verifier.verify("".join(characters))
            outcomes.add("accepted")
        except TokenRejected as error:
            outcomes.add(error.reason)

    assert outcomes <= {"accepted", *VERIFIER_REASONS}
    assert "BAD_SIGNATURE" in outcomes


async def test_exp_nan_is_malformed(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    token = maker.signed(maker.claims(exp=float("nan")))

    assert await reason_of(verifier, token) == "MALFORMED_TOKEN"


async def test_oversized_token_is_malformed(verifier: FirebaseTokenVerifier) -> None:
    assert await reason_of(verifier, "a" * 20_000) == "MALFORMED_TOKEN"


async def test_non_ascii_token_is_malformed(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    assert await reason_of(verifier, maker.signed() + "\u00e9") == "MALFORMED_TOKEN"


async def test_non_string_token_is_malformed(verifier: FirebaseTokenVerifier) -> None:
    assert await reason_of(verifier, None) == "MALFORMED_TOKEN"  # type: ignore[arg-type]


async def test_expired_message_names_expiry(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    expired_at = maker.now - 10
    token = maker.signed(maker.claims(iat=maker.now - 3600, exp=expired_at))

    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)

    assert caught.value.message == (
        f"ID token expired at {format_time(expired_at)}: get a fresh token from the client SDK and retry"
    )


async def test_wrong_audience_message(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    token = maker.signed(maker.claims(aud="other-project"))

    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)

    assert caught.value.message == "ID token aud must be the project id functions-test: got other-project"


async def test_future_iat_message_names_skew(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    token = maker.signed(maker.claims(iat=maker.now + 600))

    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)

    assert "plus 5 s of clock skew" in caught.value.message
    assert format_time(maker.now + 600) in caught.value.message


async def test_long_claim_is_shortened_in_message(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    token = maker.signed(maker.claims(aud="x" * 500))

    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token)

    assert "x" * 65 not in caught.value.message


# Emulator mode.


async def test_emulator_accepts_unsigned_token(maker: TokenMaker) -> None:
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=None, emulator=True, clock=FakeClock(maker.now))

    principal = await verifier.verify(unsigned_token(maker.claims(uid="emulated")))

    assert principal.uid == "emulated"


async def test_emulator_rejects_expired_unsigned_token(maker: TokenMaker) -> None:
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=None, emulator=True, clock=FakeClock(maker.now))
    token = unsigned_token(maker.claims(iat=maker.now - 3600, exp=maker.now - 10))

    assert await reason_of(verifier, token) == "TOKEN_EXPIRED"


async def test_emulator_still_checks_audience(maker: TokenMaker) -> None:
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=None, emulator=True, clock=FakeClock(maker.now))

    assert await reason_of(verifier, unsigned_token(maker.claims(aud="other-project"))) == "WRONG_AUDIENCE"


async def test_unsigned_token_rejected_outside_emulator(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    token = unsigned_token(maker.claims(uid="emulated"))

    assert await reason_of(verifier, token) == "UNSUPPORTED_ALGORITHM"


def test_verifier_needs_certificates_outside_emulator() -> None:
    with pytest.raises(ValueError, match="certificates"):
        FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=None)


def test_verifier_rejects_skew_above_60(certificates: CertificateSource) -> None:
    with pytest.raises(ValueError, match="clock_skew_seconds"):
        FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=certificates, clock_skew_seconds=61)


def test_source_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="https://"):
        CertificateSource("ftp://example.com/certs.json", timeout_seconds=1.0)


# The principal.


async def test_principal_carries_claims(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    claims = maker.claims(uid="alice", roles=["admin", "editor"])

    principal = await verifier.verify(maker.signed(claims))

    assert principal.uid == "alice"
    assert principal.email == "alice@example.com"
    assert principal.email_verified is True
    assert principal.roles == ("admin", "editor")
    assert principal.sign_in_provider == "password"
    assert principal.auth_time == claims["auth_time"]
    assert principal.issued_at == claims["iat"]
    assert principal.expires_at == claims["exp"]
    assert principal.claims == claims


async def test_malformed_roles_are_ignored(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    as_string = await verifier.verify(maker.signed(maker.claims(uid="a", roles="admin")))
    mixed = await verifier.verify(maker.signed(maker.claims(uid="b", roles=["admin", 5, "", None, "editor"])))

    assert as_string.roles == ()
    assert mixed.roles == ("admin", "editor")


async def test_missing_optional_claims_give_defaults(verifier: FirebaseTokenVerifier, maker: TokenMaker) -> None:
    claims = maker.claims(email=maker.now, email_verified="yes", firebase="password")

    principal = await verifier.verify(maker.signed(claims))

    assert principal.email == ""
    assert principal.email_verified is False
    assert principal.sign_in_provider == ""
    assert principal.roles == ()


# Certificate caching and failures.


async def test_certificates_cached_for_max_age(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, cert_server: CertificateServer, source_clock: FakeClock
) -> None:
    await verifier.verify(token_for(maker, "first"))
    await verifier.verify(token_for(maker, "second"))
    requests_within_max_age = cert_server.request_count
    source_clock.advance(3601)
    await verifier.verify(token_for(maker, "third"))

    assert requests_within_max_age == 1
    assert cert_server.request_count == 2


async def test_max_age_zero_refetches(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, cert_server: CertificateServer
) -> None:
    cert_server.max_age = 0

    await verifier.verify(token_for(maker, "first"))
    await verifier.verify(token_for(maker, "second"))

    assert cert_server.request_count == 2


async def test_missing_cache_control_caches_60_seconds(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, cert_server: CertificateServer, source_clock: FakeClock
) -> None:
    cert_server.max_age = None

    await verifier.verify(token_for(maker, "first"))
    source_clock.advance(59)
    await verifier.verify(token_for(maker, "second"))
    requests_within_fallback = cert_server.request_count
    source_clock.advance(2)
    await verifier.verify(token_for(maker, "third"))

    assert requests_within_fallback == 1
    assert cert_server.request_count == 2


async def test_concurrent_cold_verifies_make_one_request(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, cert_server: CertificateServer
) -> None:
    cert_server.delay_seconds = 0.2
    tokens = [token_for(maker, f"user-{index}") for index in range(20)]

    principals = await asyncio.gather(*(verifier.verify(token) for token in tokens))

    assert [principal.uid for principal in principals] == [f"user-{index}" for index in range(20)]
    assert cert_server.request_count == 1


async def test_closed_port_is_unavailable_quickly(maker: TokenMaker) -> None:
    url = unused_loopback_url()
    source = CertificateSource(url, timeout_seconds=0.5)
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=source, clock=FakeClock(maker.now))

    started = time.monotonic()
    with pytest.raises(CertificatesUnavailable) as caught:
        await verifier.verify(maker.signed())
    elapsed = time.monotonic() - started
    await source.aclose()

    assert elapsed < 0.5
    assert url not in caught.value.message
    assert caught.value.reason == "CERTIFICATES_UNAVAILABLE"


async def test_slow_endpoint_is_unavailable_within_timeout(maker: TokenMaker, cert_server: CertificateServer) -> None:
    cert_server.delay_seconds = 5.0
    source_clock = FakeClock()
    source = CertificateSource(cert_server.url, timeout_seconds=0.3, clock=source_clock)
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=source, clock=FakeClock(maker.now))

    started = time.monotonic()
    with pytest.raises(CertificatesUnavailable):
        await verifier.verify(maker.signed())
    elapsed = time.monotonic() - started
    cert_server.delay_seconds = 0.0
    source_clock.advance(2)
    recovered = await verifier.verify(maker.signed())
    await source.aclose()

    assert 0.25 <= elapsed < 1.0
    assert recovered.uid == "user-1"


async def test_failed_fetch_is_remembered_briefly(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, cert_server: CertificateServer, source_clock: FakeClock
) -> None:
    cert_server.status = 503

    with pytest.raises(CertificatesUnavailable):
        await verifier.verify(token_for(maker, "first"))
    with pytest.raises(CertificatesUnavailable):
        await verifier.verify(token_for(maker, "second"))
    requests_within_memory = cert_server.request_count
    source_clock.advance(1.5)
    cert_server.status = 200
    await verifier.verify(token_for(maker, "third"))

    assert requests_within_memory == 1
    assert cert_server.request_count == 2


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b"[]", b'{"key-1": "not a certificate"}', b"{}"],
    ids=["html", "array", "bad certificate", "empty object"],
)
async def test_garbage_document_is_unavailable(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, cert_server: CertificateServer, body: bytes
) -> None:
    cert_server.document = body

    with pytest.raises(CertificatesUnavailable):
        await verifier.verify(maker.signed())


async def test_stale_keys_serve_during_outage(
    verifier: FirebaseTokenVerifier,
    maker: TokenMaker,
    cert_server: CertificateServer,
    source_clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert_server.max_age = 60
    await verifier.verify(token_for(maker, "before-outage"))
    cert_server.status = 503
    source_clock.advance(61)

    with caplog.at_level(logging.WARNING, logger="app.platform.auth.certificates"):
        during_grace = await verifier.verify(token_for(maker, "during-grace"))
    source_clock.advance(3600)
    with pytest.raises(CertificatesUnavailable):
        await verifier.verify(token_for(maker, "after-grace"))

    assert during_grace.uid == "during-grace"
    assert any("expired copy stays in use" in record.getMessage() for record in caplog.records)


async def test_unknown_kid_refetches_at_most_every_few_seconds(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, cert_server: CertificateServer, source_clock: FakeClock
) -> None:
    await verifier.verify(token_for(maker, "first"))
    cert_server.document = certs_document({KID: rsa_key("signing"), "key-2": rsa_key("other")})
    rotated = sign_rs256(maker.claims(uid="rotated"), rsa_key("other"), kid="key-2")

    soon_after_fetch = await reason_of(verifier, rotated)
    requests_soon_after = cert_server.request_count
    source_clock.advance(6)
    principal = await verifier.verify(rotated)
    unknown_right_after = await reason_of(verifier, maker.signed(kid="no-such-key"))

    assert soon_after_fetch == "UNKNOWN_KID"
    assert requests_soon_after == 1
    assert principal.uid == "rotated"
    assert unknown_right_after == "UNKNOWN_KID"
    assert cert_server.request_count == 2


# The verified-token cache and the revocation checker.


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record a call of the RS256 signature check in the returned list."""
    calls: list[str] = []
    real_verify = tokens_module.verify_rs256

    def counting_verify(public_key, signing_input: bytes, signature: bytes) -> bool:  # noqa: ANN001
        calls.append("verify")
        return real_verify(public_key, signing_input, signature)

    monkeypatch.setattr(tokens_module, "verify_rs256", counting_verify)
    return calls


async def test_cache_hit_skips_signature_check(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, signature_checks: list[str]
) -> None:
    token = maker.signed()

    first = await verifier.verify(token)
    second = await verifier.verify(token)

    assert second == first
    assert len(signature_checks) == 1


async def test_cached_token_expires(
    verifier: FirebaseTokenVerifier, maker: TokenMaker, verifier_clock: FakeClock
) -> None:
    token = maker.signed(maker.claims(exp=maker.now + 60))
    await verifier.verify(token)
    verifier_clock.advance(60 + CLOCK_SKEW_SECONDS + 1)

    assert await reason_of(verifier, token) == "TOKEN_EXPIRED"


async def test_cache_evicts_least_recently_used(
    certificates: CertificateSource, maker: TokenMaker, signature_checks: list[str]
) -> None:
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=certificates, clock=FakeClock(maker.now), cache_size=2)
    first, second, third = (token_for(maker, uid) for uid in ("first", "second", "third"))

    for token in (first, second, third, third, first):
        await verifier.verify(token)

    assert len(signature_checks) == 4


async def test_revocation_checker_skips_fresh_cache_hits(certificates: CertificateSource, maker: TokenMaker) -> None:
    checked: list[str] = []

    async def check(principal: Principal) -> None:
        checked.append(principal.uid)

    verifier = FirebaseTokenVerifier(
        project_id=PROJECT_ID, certificates=certificates, clock=FakeClock(maker.now), revocation_checker=check
    )
    token = maker.signed()

    await verifier.verify(token)
    await verifier.verify(token)

    assert checked == ["user-1"]


async def test_revoked_token_is_rejected_and_not_cached(certificates: CertificateSource, maker: TokenMaker) -> None:
    checked: list[str] = []

    async def revoke(principal: Principal) -> None:
        checked.append(principal.uid)
        raise TokenRejected("ID token was revoked: sign in again", reason="TOKEN_REVOKED")

    verifier = FirebaseTokenVerifier(
        project_id=PROJECT_ID, certificates=certificates, clock=FakeClock(maker.now), revocation_checker=revoke
    )
    token = maker.signed()

    first = await reason_of(verifier, token)
    second = await reason_of(verifier, token)

    assert first == "TOKEN_REVOKED"
    assert second == "TOKEN_REVOKED"
    assert checked == ["user-1", "user-1"]


async def test_cached_token_is_rechecked_after_interval(certificates: CertificateSource, maker: TokenMaker) -> None:
    checked: list[str] = []

    async def check(principal: Principal) -> None:
        checked.append(principal.uid)

    clock = FakeClock(maker.now)
    verifier = FirebaseTokenVerifier(
        project_id=PROJECT_ID, certificates=certificates, clock=clock, revocation_checker=check,
        revocation_recheck_seconds=60,
    )
    token = maker.signed()

    await verifier.verify(token)
    clock.advance(30)
    await verifier.verify(token)
    clock.advance(31)
    await verifier.verify(token)

    assert checked == ["user-1", "user-1"]


async def test_forget_user_drops_cached_tokens(
    certificates: CertificateSource, maker: TokenMaker, signature_checks: list[str]
) -> None:
    verifier = FirebaseTokenVerifier(project_id=PROJECT_ID, certificates=certificates, clock=FakeClock(maker.now))
    token = maker.signed()

    await verifier.verify(token)
    verifier.forget_user("someone-else")
    await verifier.verify(token)
    verifier.forget_user("user-1")
    await verifier.verify(token)

    assert len(signature_checks) == 2


# The development key pair over file://.


async def test_dev_token_verifies_through_file_url(tmp_path) -> None:  # noqa: ANN001
    keys = ensure_dev_keys(tmp_path / "keys")
    source = CertificateSource(keys.certs_url, timeout_seconds=1.0)
    verifier = FirebaseTokenVerifier(project_id="functions-dev", certificates=source)

    principal = await verifier.verify(
        mint_token(keys, project_id="functions-dev", uid="dev-user", email="dev@example.com", roles=["admin"])
    )

    assert principal.uid == "dev-user"
    assert principal.roles == ("admin",)
    assert principal.sign_in_provider == "password"
    assert principal.claims["user_id"] == "dev-user"


async def test_dev_token_without_email_is_custom(tmp_path) -> None:  # noqa: ANN001
    keys = ensure_dev_keys(tmp_path / "keys")
    verifier = FirebaseTokenVerifier(
        project_id="functions-dev", certificates=CertificateSource(keys.certs_url, timeout_seconds=1.0)
    )

    principal = await verifier.verify(mint_token(keys, project_id="functions-dev", uid="service"))

    assert principal.sign_in_provider == "custom"
    assert principal.email == ""
    assert principal.roles == ()


def test_dev_keys_are_private_and_reused(tmp_path) -> None:  # noqa: ANN001
    directory = tmp_path / "keys"
    first = ensure_dev_keys(directory)
    certs_mtime = first.certs_path.stat().st_mtime_ns
    second = ensure_dev_keys(directory)

    assert first.kid.startswith("dev-")
    assert second.kid == first.kid
    assert first.certs_path.stat().st_mtime_ns == certs_mtime
    assert (directory / "private_key.pem").stat().st_mode & 0o777 == 0o600


def test_dev_certs_rewritten_when_missing(tmp_path) -> None:  # noqa: ANN001
    directory = tmp_path / "keys"
    first = ensure_dev_keys(directory)
    first.certs_path.unlink()

    second = ensure_dev_keys(directory)

    assert second.kid == first.kid
    assert first.kid in second.certs_path.read_text()


async def test_file_certificates_reread_after_change(tmp_path) -> None:  # noqa: ANN001
    keys = ensure_dev_keys(tmp_path / "keys")
    replacement = ensure_dev_keys(tmp_path / "replacement")
    clock = FakeClock()
    source = CertificateSource(keys.certs_url, timeout_seconds=1.0, clock=clock)
    verifier = FirebaseTokenVerifier(project_id="functions-dev", certificates=source)
    await verifier.verify(mint_token(keys, project_id="functions-dev", uid="before"))

    shutil.copyfile(replacement.certs_path, keys.certs_path)
    os.utime(keys.certs_path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    clock.advance(61)
    principal = await verifier.verify(mint_token(replacement, project_id="functions-dev", uid="after"))

    assert principal.uid == "after"
    assert await reason_of(verifier, mint_token(keys, project_id="functions-dev", uid="old")) == "UNKNOWN_KID"
