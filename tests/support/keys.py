"""RSA keys and Google-format certificate documents for tests."""

from __future__ import annotations

import functools
import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.platform.auth.devkeys import self_signed_certificate


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """Return a 2048-bit RSA key, the same one for the same name within a test session."""
    # Generating a key takes tens of milliseconds, so each name is generated once per session.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def certificate_pem(key: rsa.RSAPrivateKey) -> str:
    """Return a self-signed PEM X.509 certificate for the key."""
    return self_signed_certificate(key, common_name="functions test token signer")


def public_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    """Return the PEM SubjectPublicKeyInfo of the key, as used in HS256 key-confusion attacks."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def certs_document(keys: dict[str, rsa.RSAPrivateKey]) -> dict[str, str]:
    """Return Google's certificate document for the keys: {kid: PEM certificate}."""
    return {kid: _cached_certificate(key) for kid, key in keys.items()}


def certs_json(keys: dict[str, rsa.RSAPrivateKey]) -> bytes:
    """Return `certs_document` serialized as the JSON body Google serves."""
    return json.dumps(certs_document(keys)).encode()


@functools.cache
def _cached_certificate(key: rsa.RSAPrivateKey) -> str:
    return certificate_pem(key)
