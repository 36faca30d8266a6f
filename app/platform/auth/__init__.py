"""Firebase ID token verification: certificates, the verifier and the development key pair."""

from app.platform.auth.certificates import CertificateSource
from app.platform.auth.devkeys import DevKeys, ensure_dev_keys, mint_token
from app.platform.auth.tokens import (
    CertificatesUnavailable,
    FirebaseTokenVerifier,
    TokenRejected,
)

__all__ = [
    "CertificateSource",
    "CertificatesUnavailable",
    "DevKeys",
    "FirebaseTokenVerifier",
    "TokenRejected",
    "ensure_dev_keys",
    "mint_token",
]
