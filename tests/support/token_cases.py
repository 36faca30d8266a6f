"""One table of ID tokens, good and bad, shared by the verifier's unit and differential tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.keys import public_key_pem
from tests.support.tokens import (
    OMIT,
    firebase_claims,
    sign_hs256,
    sign_rs256,
    unsigned_token,
)


@dataclass(frozen=True)
class TokenMaker:
    """What a case needs to build its token: the project, the published key and an unpublished one."""

    project_id: str
    kid: str
    key: rsa.RSAPrivateKey
    other_key: rsa.RSAPrivateKey
    now: int

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Return valid claims for this project at `now`, with overrides (OMIT removes a claim)."""
        return firebase_claims(project_id=self.project_id, now=self.now, **overrides)

    def signed(self, claims: dict[str, Any] | None = None, **header: Any) -> str:
        """Return claims (valid ones by default) signed with the published key."""
        header.setdefault("kid", self.kid)
        return sign_rs256(self.claims() if claims is None else claims, self.key, **header)


@dataclass(frozen=True)
class TokenCase:
    """A token and the verdict for it: `reason` is None for accepted, else the rejection reason."""

    name: str
    build: Callable[[TokenMaker], str]
    reason: str | None
    # Whether firebase-admin 7.7.0, with the same clock skew, reaches the same verdict.
    firebase_admin_agrees: bool = True
    # Whether firebase-admin returns a verdict at all, because some malformed claims make it raise TypeError.
    firebase_admin_comparable: bool = True


def _tampered(maker: TokenMaker) -> str:
    header, _, signature = maker.signed().split(".")
    _, forged_claims, _ = maker.signed(maker.claims(uid="someone-else")).split(".")
    return f"{header}.{forged_claims}.{signature}"


# The clock skew these cases assume: 5 s.
CLOCK_SKEW_SECONDS = 5

TOKEN_CASES: tuple[TokenCase, ...] = (
    TokenCase("good", lambda m: m.signed(), None),
    TokenCase("sub of 128 characters", lambda m: m.signed(m.claims(uid="u" * 128)), None),
    TokenCase("iat within skew", lambda m: m.signed(m.claims(iat=m.now + 3)), None),
    TokenCase("exp within skew", lambda m: m.signed(m.claims(iat=m.now - 3600, exp=m.now - 3)), None),
    TokenCase("expired", lambda m: m.signed(m.claims(iat=m.now - 3600, exp=m.now - 10)), "TOKEN_EXPIRED"),
    TokenCase("future iat", lambda m: m.signed(m.claims(iat=m.now + 600)), "TOKEN_NOT_YET_VALID"),
    TokenCase(
        "future auth_time",
        lambda m: m.signed(m.claims(auth_time=m.now + 600)),
        "TOKEN_NOT_YET_VALID",
        firebase_admin_agrees=False,
    ),
    TokenCase("missing auth_time", lambda m: m.signed(m.claims(auth_time=OMIT)), "MISSING_CLAIM", firebase_admin_agrees=False),
    TokenCase("missing exp", lambda m: m.signed(m.claims(exp=OMIT)), "MISSING_CLAIM"),
    TokenCase("wrong aud", lambda m: m.signed(m.claims(aud="other-project")), "WRONG_AUDIENCE"),
    TokenCase(
        "wrong iss",
        lambda m: m.signed(m.claims(iss="https://securetoken.google.com/other-project")),
        "WRONG_ISSUER",
    ),
    TokenCase("empty sub", lambda m: m.signed(m.claims(uid="")), "BAD_SUBJECT"),
    TokenCase("sub of 129 characters", lambda m: m.signed(m.claims(uid="u" * 129)), "BAD_SUBJECT"),
    TokenCase("numeric sub", lambda m: m.signed(m.claims(sub=42)), "BAD_SUBJECT"),
    TokenCase("no kid", lambda m: m.signed(kid=OMIT), "UNKNOWN_KID"),
    TokenCase("unknown kid", lambda m: m.signed(kid="no-such-key"), "UNKNOWN_KID"),
    TokenCase("signed with another key", lambda m: sign_rs256(m.claims(), m.other_key, kid=m.kid), "BAD_SIGNATURE"),
    TokenCase("tampered claims", _tampered, "BAD_SIGNATURE"),
    TokenCase("alg none", lambda m: unsigned_token(m.claims(), kid=m.kid), "UNSUPPORTED_ALGORITHM"),
    TokenCase(
        "HS256 with the public key as secret",
        lambda m: sign_hs256(m.claims(), public_key_pem(m.key), kid=m.kid),
        "UNSUPPORTED_ALGORITHM",
    ),
    TokenCase("garbage", lambda m: "not a token at all", "MALFORMED_TOKEN"),
    TokenCase("garbage segments", lambda m: "abc.def.ghi", "MALFORMED_TOKEN"),
    TokenCase("empty string", lambda m: "", "MALFORMED_TOKEN"),
    TokenCase("two segments", lambda m: m.signed().rsplit(".", 1)[0], "MALFORMED_TOKEN"),
    TokenCase("four segments", lambda m: m.signed() + ".abc", "MALFORMED_TOKEN"),
    TokenCase("claims not an object", lambda m: m.signed([1, 2, 3]), "MALFORMED_TOKEN"),
    TokenCase(
        "exp as a string",
        lambda m: m.signed(m.claims(exp=str(m.now + 3600))),
        "MALFORMED_TOKEN",
        firebase_admin_comparable=False,
    ),
)
