"""Builders of arbitrary JWTs: Firebase-shaped claims, RS256, HS256 and unsigned tokens, raw segments."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# Pass as a claim or header value to leave that entry out.
OMIT: Any = object()


def firebase_claims(*, project_id: str, uid: str = "user-1", now: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Return the claims of a valid Firebase ID token issued at `now`, with overrides applied.

    An override of OMIT removes the claim: `firebase_claims(project_id="p", exp=OMIT)`.
    """
    issued_at = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": f"https://securetoken.google.com/{project_id}",
        "aud": project_id,
        "auth_time": issued_at - 60,
        "user_id": uid,
        "sub": uid,
        "iat": issued_at,
        "exp": issued_at + 3600,
        "email": f"{uid}@example.com",
        "email_verified": True,
        "firebase": {"identities": {"email": [f"{uid}@example.com"]}, "sign_in_provider": "password"},
    }
    return _apply(claims, overrides)


def b64url(data: bytes) -> str:
    """Encode bytes as unpadded base64url, as JWT segments are."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_segment(value: Any) -> str:
    """Encode a JSON value as a base64url JWT segment."""
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def assemble(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """Join a header, claims and a signature into a compact JWT, signing nothing."""
    return f"{json_segment(header)}.{json_segment(claims)}.{b64url(signature)}"


def sign_rs256(claims: dict[str, Any], key: rsa.RSAPrivateKey, *, kid: Any = "key-1", **header: Any) -> str:
    """Return an RS256 token; kid=OMIT leaves the kid out, and keyword arguments set header entries."""
    full_header = _apply({"alg": "RS256", "kid": kid, "typ": "JWT"}, header)
    signing_input = f"{json_segment(full_header)}.{json_segment(claims)}".encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def sign_hs256(claims: dict[str, Any], secret: bytes, *, kid: Any = "key-1") -> str:
    """Return an HS256 token with the secret as HMAC key (for key-confusion attacks, a public key PEM)."""
    header = _apply({"alg": "HS256", "kid": kid, "typ": "JWT"}, {})
    signing_input = f"{json_segment(header)}.{json_segment(claims)}".encode("ascii")
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def unsigned_token(claims: dict[str, Any], *, kid: Any = OMIT) -> str:
    """Return an alg "none" token with an empty signature, as the Firebase Auth emulator issues."""
    return assemble(_apply({"alg": "none", "typ": "JWT", "kid": kid}, {}), claims)


def _apply(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**values, **overrides}
    return {name: value for name, value in merged.items() if value is not OMIT}
