"""Test helpers for Firebase ID tokens: keys, certificate documents, a certificate server, tokens.

    from tests.support import CertificateServer, certs_document, rsa_key, firebase_claims, sign_rs256

    key = rsa_key("signing")                      # 2048-bit RSA key, one per name per session
    with CertificateServer(certs_document({"key-1": key}), max_age=3600) as server:
        source = CertificateSource(server.url, timeout_seconds=1.0)
        token = sign_rs256(firebase_claims(project_id="functions-test"), key, kid="key-1")
        ...
        assert server.request_count == 1

Keys (tests.support.keys): `rsa_key(name)`, `certificate_pem(key)`, `public_key_pem(key)`,
`certs_document({kid: key})` (Google's {kid: PEM certificate}), `certs_json(...)` (its bytes).

Server (tests.support.cert_server): `CertificateServer(document, max_age=...)` serves over a real
socket on 127.0.0.1 from a thread. Change `document`, `max_age`, `status` or `delay_seconds` while
it runs, and read `url` and `request_count`. `unused_loopback_url()` refuses connections.

Tokens (tests.support.tokens): `firebase_claims(project_id=..., uid=..., now=..., **overrides)`
with `OMIT` to drop a claim; `sign_rs256`, `sign_hs256`, `unsigned_token` (alg "none", as the
Auth emulator issues) and `assemble(header, claims, signature)` for hand-made tokens.

Clock (tests.support.clock): `FakeClock(now)`, a callable clock that `advance(seconds)` moves, for
the `clock=` parameter of CertificateSource and FirebaseTokenVerifier.

Cases (tests.support.token_cases): `TOKEN_CASES`, the table of good and bad tokens with the
expected rejection reason, built with a `TokenMaker` (project, published key, other key, now).
"""

from tests.support.cert_server import CertificateServer, unused_loopback_url
from tests.support.clock import FakeClock
from tests.support.keys import (
    certificate_pem,
    certs_document,
    certs_json,
    public_key_pem,
    rsa_key,
)
from tests.support.token_cases import (
    CLOCK_SKEW_SECONDS,
    TOKEN_CASES,
    TokenCase,
    TokenMaker,
)
from tests.support.tokens import (
    OMIT,
    assemble,
    firebase_claims,
    sign_hs256,
    sign_rs256,
    unsigned_token,
)

__all__ = [
    "CLOCK_SKEW_SECONDS",
    "OMIT",
    "TOKEN_CASES",
    "CertificateServer",
    "FakeClock",
    "TokenCase",
    "TokenMaker",
    "assemble",
    "certificate_pem",
    "certs_document",
    "certs_json",
    "firebase_claims",
    "public_key_pem",
    "rsa_key",
    "sign_hs256",
    "sign_rs256",
    "unsigned_token",
    "unused_loopback_url",
]
