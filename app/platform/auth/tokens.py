"""Verification of Firebase ID tokens into the Principal of a request.

The rules are the ones Firebase documents for verifying ID tokens with a third-party JWT library,
checked against firebase-admin 7.7.0 (`firebase_admin/_token_gen.py`) and the google-auth
`jwt.decode` it calls:

- the header has alg RS256 and a kid that names one of Google's current certificates, and the
  signature verifies with that certificate's key;
- aud is the project id, iss is `https://securetoken.google.com/<project id>`, sub is a
  non-empty string of at most 128 characters;
- exp, iat, aud, iss, sub and auth_time are present;
- iat and auth_time are not later than now plus the clock skew, and exp plus the clock skew is
  not earlier than now.

The clock skew applies to exp as well as to iat, as in firebase-admin when `verify_id_token` gets
the same `clock_skew_seconds` (google-auth rejects a token when `exp + skew < now`), and it is
limited to 0-60 s as there. Unlike firebase-admin, auth_time is required and checked, and time
claims are checked in emulator mode too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from app.platform.context import Principal
from app.platform.errors import Unauthenticated, Unavailable

if TYPE_CHECKING:
    from app.platform.auth.certificates import CertificateSource

ISSUER_PREFIX = "https://securetoken.google.com/"
REQUIRED_CLAIMS = ("exp", "iat", "aud", "iss", "sub", "auth_time")
MAX_SUBJECT_CHARS = 128
# firebase-admin rejects a larger clock_skew_seconds; keeping the same range keeps the verdicts equal.
MAX_CLOCK_SKEW_SECONDS = 60
# Firebase limits custom claims to 1000 bytes (MAX_CLAIMS_PAYLOAD_SIZE in firebase-admin), so a real
# ID token is far shorter. The limit keeps hashing and JSON parsing of hostile input cheap.
MAX_TOKEN_CHARS = 16 * 1024
# Token values longer than this are cut short when an error message quotes them.
MAX_SHOWN_CHARS = 64

RevocationChecker = Callable[[Principal], Awaitable[None]]

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_RETRY_HINT = "get a fresh token from the client SDK and retry"


# 9999-12-31T23:59:59Z, the last second a google.protobuf.Timestamp can hold.
MAX_EPOCH_SECONDS = 253_402_300_799


class TokenRejected(Unauthenticated):
    """An ID token that failed verification; `reason` is the machine-readable cause.

    Reasons: MALFORMED_TOKEN, UNSUPPORTED_ALGORITHM, UNKNOWN_KID, BAD_SIGNATURE, MISSING_CLAIM,
    WRONG_AUDIENCE, WRONG_ISSUER, BAD_SUBJECT, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, and from a
    revocation checker TOKEN_REVOKED and USER_DISABLED.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)


class CertificatesUnavailable(Unavailable):
    """The certificates that verify ID tokens could not be fetched; `detail` is the cause, for logs."""

    reason = "CERTIFICATES_UNAVAILABLE"

    def __init__(
        self,
        message: str = "ID token signing certificates are unavailable: retry shortly",
        *,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.detail = detail or message


class FirebaseTokenVerifier:
    """Verifies Firebase ID tokens and caches the verified ones until they expire."""

    def __init__(
        self,
        *,
        project_id: str,
        certificates: CertificateSource | None,
        clock_skew_seconds: int = 5,
        emulator: bool = False,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        revocation_checker: RevocationChecker | None = None,
        revocation_recheck_seconds: float = 60.0,
    ) -> None:
        """Create a verifier.

        Args:
            certificates: where the signing keys come from; may be None only in emulator mode.
            emulator: accept tokens of the Firebase Auth emulator, which are unsigned.
            cache_size: how many verified tokens to keep; 0 turns the cache off.
            revocation_checker: called with the principal of each token that is not in the cache,
                and again for a cached token once its last check is revocation_recheck_seconds old.
                It raises TokenRejected (TOKEN_REVOKED, USER_DISABLED) to reject it. A revocation
                made through this process takes effect at once (see forget_user); one made
                elsewhere, within revocation_recheck_seconds.
        """
        if not project_id:
            raise ValueError("project_id must not be empty")
        if not 0 <= clock_skew_seconds <= MAX_CLOCK_SKEW_SECONDS:
            raise ValueError(f"clock_skew_seconds must be between 0 and {MAX_CLOCK_SKEW_SECONDS}: got {clock_skew_seconds}")
        if certificates is None and not emulator:
            raise ValueError("certificates must be given unless emulator is true")
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 or more: got {cache_size}")

        self._project_id = project_id
        self._issuer = ISSUER_PREFIX + project_id
        self._certificates = certificates
        self._skew = clock_skew_seconds
        self._emulator = emulator
        self._clock = clock
        self._cache_size = cache_size
        self._revocation_checker = revocation_checker
        self._revocation_recheck_seconds = revocation_recheck_seconds
        # Keyed by the SHA-256 digest of the token, so the cache contains no usable token. Each
        # entry contains the principal, the token's exp and when its revocation was last checked.
        self._cache: OrderedDict[bytes, tuple[Principal, float, float]] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        """Return the principal of a valid ID token.

        Every request with the same token gets the same cached Principal, so treat its claims as
        read-only.

        Raises:
            TokenRejected: when the token is not a valid ID token for this project.
            CertificatesUnavailable: when the signing certificates cannot be fetched.
        """
        if not isinstance(token, str) or not token:
            raise TokenRejected("ID token must be a non-empty string", reason="MALFORMED_TOKEN")
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise TokenRejected(
                f"ID token must be at most {MAX_TOKEN_CHARS} ASCII characters: got {len(token)} characters",
                reason="MALFORMED_TOKEN",
            )

        now = self._clock()
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            principal, expires_at, checked_at = cached
            if not self._is_expired(expires_at, now) and not self._is_recheck_due(checked_at, now):
                self._cache.move_to_end(digest)
                return principal
            del self._cache[digest]
            if not self._is_expired(expires_at, now):
                # Only the revocation check is due: the signature and claims were verified already.
                await self._check_revocation(principal)
                self._remember(digest, principal, expires_at, now)
                return principal

        principal, expires_at = await self._verify_uncached(token, now)

        await self._check_revocation(principal)
        self._remember(digest, principal, expires_at, now)
        return principal

    def forget_all(self) -> None:
        """Drop every cached token, so each next call is verified and checked again."""
        self._cache.clear()

    def forget_user(self, uid: str) -> None:
        """Drop the cached tokens of a user, so their next call is verified and checked again."""
        for digest in [d for d, (principal, _, _) in self._cache.items() if principal.uid == uid]:
            del self._cache[digest]

    async def _check_revocation(self, principal: Principal) -> None:
        if self._revocation_checker is not None:
            await self._revocation_checker(principal)

    def _is_recheck_due(self, checked_at: float, now: float) -> bool:
        return self._revocation_checker is not None and now - checked_at >= self._revocation_recheck_seconds

    async def _verify_uncached(self, token: str, now: float) -> tuple[Principal, float]:
        header, claims, signing_input, signature = decode_token(token)

        # The Auth emulator signs nothing (alg "none", empty signature, no kid), and firebase-admin
        # skips the header and signature checks when FIREBASE_AUTH_EMULATOR_HOST is set.
        kid = "" if self._emulator else self._check_header(header)
        self._check_identity_claims(claims)
        self._check_times(claims, now)
        if not self._emulator:
            await self._check_signature(kid, signing_input, signature)

        return principal_from_claims(claims), claims["exp"]

    def _check_header(self, header: dict[str, Any]) -> str:
        """Return the kid of a header that names RS256 and a key."""
        alg = header.get("alg")
        if alg != "RS256":
            raise TokenRejected(f"ID token alg must be RS256: got {describe_value(alg)}", reason="UNSUPPORTED_ALGORITHM")

        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected(
                f"ID token header must contain a kid naming a signing certificate: got {describe_value(kid)}",
                reason="UNKNOWN_KID",
            )
        return kid

    def _check_identity_claims(self, claims: dict[str, Any]) -> None:
        for name in REQUIRED_CLAIMS:
            if name not in claims:
                raise TokenRejected(f"ID token must contain the {name} claim", reason="MISSING_CLAIM")

        audience = claims["aud"]
        if audience != self._project_id:
            raise TokenRejected(
                f"ID token aud must be the project id {self._project_id}: got {describe_value(audience)}",
                reason="WRONG_AUDIENCE",
            )

        issuer = claims["iss"]
        if issuer != self._issuer:
            raise TokenRejected(f"ID token iss must be {self._issuer}: got {describe_value(issuer)}", reason="WRONG_ISSUER")

        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_CHARS:
            received = f"{len(subject)} characters" if isinstance(subject, str) else describe_value(subject)
            raise TokenRejected(
                f"ID token sub must be a string of 1 to {MAX_SUBJECT_CHARS} characters: got {received}",
                reason="BAD_SUBJECT",
            )

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        for name in ("exp", "iat", "auth_time"):
            value = claims[name]
            # 1e309 parses as float infinity, and a huge number breaks Timestamp conversion later.
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_EPOCH_SECONDS:
                raise TokenRejected(
                    f"ID token {name} must be a number of seconds since the epoch before the year 10000: "
                    f"got {describe_value(value)}",
                    reason="MALFORMED_TOKEN",
                )

        if self._is_expired(claims["exp"], now):
            raise TokenRejected(f"ID token expired at {format_time(claims['exp'])}: {_RETRY_HINT}", reason="TOKEN_EXPIRED")

        latest = now + self._skew
        for name in ("iat", "auth_time"):
            if claims[name] > latest:
                raise TokenRejected(
                    f"ID token {name} must not be later than {format_time(now)} plus {self._skew} s of clock skew: "
                    f"got {format_time(claims[name])}. Check the clock of this server",
                    reason="TOKEN_NOT_YET_VALID",
                )

    async def _check_signature(self, kid: str, signing_input: bytes, signature: bytes) -> None:
        assert self._certificates is not None
        public_key = await self._certificates.public_key(kid)
        if not verify_rs256(public_key, signing_input, signature):
            raise TokenRejected(
                f"ID token signature is invalid for the certificate with kid {describe_value(kid)}: {_RETRY_HINT}",
                reason="BAD_SIGNATURE",
            )

    def _is_expired(self, expires_at: float, now: float) -> bool:
        return expires_at + self._skew < now

    def _remember(self, digest: bytes, principal: Principal, expires_at: float, checked_at: float) -> None:
        if self._cache_size == 0:
            return
        self._cache[digest] = (principal, expires_at, checked_at)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def decode_token(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split a compact JWT into its header, claims, signing input and signature, without verifying.

    Raises:
        TokenRejected: reason MALFORMED_TOKEN, when the token is not three base64url segments of
            which the first two are JSON objects.
    """
    segments = token.split(".")
    if len(segments) != 3:
        raise TokenRejected(f"ID token must have 3 dot-separated segments: got {len(segments)}", reason="MALFORMED_TOKEN")

    header_segment, claims_segment, signature_segment = segments
    header = _decode_json_segment(header_segment, "header")
    claims = _decode_json_segment(claims_segment, "payload")
    signature = _decode_segment(signature_segment, "signature")
    return header, claims, f"{header_segment}.{claims_segment}".encode("ascii"), signature


def _decode_segment(segment: str, part: str) -> bytes:
    # base64.urlsafe_b64decode skips characters outside the alphabet, so check the alphabet first.
    if _BASE64URL.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise TokenRejected(f"ID token {part} must be base64url-encoded", reason="MALFORMED_TOKEN")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _decode_json_segment(segment: str, part: str) -> dict[str, Any]:
    data = _decode_segment(segment, part)
    try:
        value = json.loads(data, parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as error:
        raise TokenRejected(f"ID token {part} must be a JSON object: {type(error).__name__}", reason="MALFORMED_TOKEN") from error

    if not isinstance(value, dict):
        raise TokenRejected(f"ID token {part} must be a JSON object: got {describe_value(value)}", reason="MALFORMED_TOKEN")
    return value


def _reject_json_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity although JSON has neither. An exp of Infinity would never expire.
    raise ValueError(f"{name} is not a JSON number")


def verify_rs256(public_key: RSAPublicKey, signing_input: bytes, signature: bytes) -> bool:
    """Return whether the signature is a valid RS256 (PKCS #1 v1.5, SHA-256) signature of the input."""
    try:
        public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """Build the Principal of verified claims, ignoring optional claims of the wrong type."""
    email = claims.get("email")
    roles = claims.get("roles")
    firebase = claims.get("firebase")
    provider = firebase.get("sign_in_provider") if isinstance(firebase, dict) else None

    return Principal(
        uid=claims["sub"],
        email=email if isinstance(email, str) else "",
        email_verified=claims.get("email_verified") is True,
        roles=tuple(role for role in roles if isinstance(role, str) and role) if isinstance(roles, list) else (),
        sign_in_provider=provider if isinstance(provider, str) else "",
        auth_time=int(claims["auth_time"]),
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
        claims=claims,
    )


def describe_value(value: object) -> str:
    """Show a claim or header value from a token in an error message, shortened and printable."""
    if isinstance(value, str):
        text = value if len(value) <= MAX_SHOWN_CHARS else value[:MAX_SHOWN_CHARS] + "..."
        return text if text and text.isprintable() else repr(text)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        text = str(value)
        return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return type(value).__name__


def format_time(seconds: float) -> str:
    """Format seconds since the epoch as an RFC 3339 UTC time, or as the number when out of range."""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return describe_value(seconds)
