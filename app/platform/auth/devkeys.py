"""The local development key pair: it signs Firebase-shaped ID tokens that the verifier accepts.

`ensure_dev_keys` keeps an RSA private key and a certs.json in Google's format (kid -> self-signed
PEM certificate) in one directory, so a CertificateSource on the file:// URL of certs.json
verifies tokens from `mint_token` exactly as it verifies Google's. Production settings refuse any
certificate URL but Google's, so these keys cannot sign production tokens.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from app.platform.auth.tokens import ISSUER_PREFIX
from app.platform.privatefiles import create_private_file, read_private_file

logger = logging.getLogger(__name__)

PRIVATE_KEY_FILE = "private_key.pem"
CERTS_FILE = "certs.json"
CERTIFICATE_VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True, slots=True)
class DevKeys:
    """The development signing key, its kid and the certs.json that publishes its certificate."""

    kid: str
    private_key: rsa.RSAPrivateKey
    certs_path: Path

    @property
    def certs_url(self) -> str:
        """Return the file:// URL of certs.json, for a CertificateSource."""
        return self.certs_path.resolve().as_uri()


def ensure_dev_keys(directory: Path) -> DevKeys:
    """Load the development key pair from the directory, creating the files that are missing.

    The private key file gets mode 0600. Processes that start together end up with the same key,
    because the key file appears with an atomic link and the loser loads the winner's file.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = directory / PRIVATE_KEY_FILE
    certs_path = directory / CERTS_FILE

    private_key = _load_or_create_private_key(key_path)
    kid = kid_for(private_key.public_key())
    if not _publishes_kid(certs_path, kid):
        _write_certs(certs_path, kid, private_key)
        logger.info("wrote development signing certificate", extra={"kid": kid, "certs_path": str(certs_path)})

    return DevKeys(kid=kid, private_key=private_key, certs_path=certs_path)


def kid_for(public_key: rsa.RSAPublicKey) -> str:
    """Return the kid of a development key: "dev-" and the start of its SHA-256 fingerprint."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "dev-" + hashlib.sha256(der).hexdigest()[:12]


def mint_token(
    keys: DevKeys,
    *,
    project_id: str,
    uid: str,
    email: str | None = None,
    roles: list[str] | None = None,
    lifetime_seconds: int = 3600,
    extra_claims: dict[str, Any] | None = None,
    now: int | None = None,
) -> str:
    """Sign an ID token shaped like Firebase's, for the development key pair.

    A token with an email looks like an email/password sign-in, one without like a custom-token
    sign-in. `extra_claims` are added last and may replace any claim.
    """
    issued_at = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": ISSUER_PREFIX + project_id,
        "aud": project_id,
        "auth_time": issued_at,
        "user_id": uid,
        "sub": uid,
        "iat": issued_at,
        "exp": issued_at + lifetime_seconds,
    }
    if email is not None:
        claims["email"] = email
        claims["email_verified"] = True
        claims["firebase"] = {"identities": {"email": [email]}, "sign_in_provider": "password"}
    else:
        claims["firebase"] = {"identities": {}, "sign_in_provider": "custom"}
    if roles is not None:
        claims["roles"] = list(roles)
    claims.update(extra_claims or {})

    return jwt.encode(claims, keys.private_key, algorithm="RS256", headers={"kid": keys.kid})


def _load_or_create_private_key(key_path: Path) -> rsa.RSAPrivateKey:
    try:
        pem = read_private_file(key_path)
    except FileNotFoundError:
        return _create_private_key(key_path)

    private_key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ValueError(f"{key_path} must contain an RSA private key: got {type(private_key).__name__}")
    return private_key


def _create_private_key(key_path: Path) -> rsa.RSAPrivateKey:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    # A concurrent creator's key is never overwritten: the loser loads the winner's.
    if not create_private_file(key_path, pem):
        return _load_or_create_private_key(key_path)

    logger.info("created development private key", extra={"path": str(key_path)})
    return private_key


def _publishes_kid(certs_path: Path, kid: str) -> bool:
    try:
        document = json.loads(certs_path.read_bytes())
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(document, dict) and isinstance(document.get(kid), str)


def _write_certs(certs_path: Path, kid: str, private_key: rsa.RSAPrivateKey) -> None:
    pem = self_signed_certificate(private_key, common_name=f"functions development token signer {kid}")
    temporary = certs_path.with_name(f".{certs_path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    temporary.write_text(json.dumps({kid: pem}, indent=2) + "\n")
    os.replace(temporary, certs_path)


def self_signed_certificate(private_key: rsa.RSAPrivateKey, *, common_name: str) -> str:
    """Return a PEM X.509 certificate for the key, signed by the key itself."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CERTIFICATE_VALIDITY)
        .sign(private_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
