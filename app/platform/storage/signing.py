"""HMAC-SHA256 signatures of the local adapter's expiring URLs, and the key that makes them.

A download URL signs (GET, key, expiry, file name, inline or attachment); an upload URL signs
(PUT, key, expiry, content type, max bytes). The fields are signed as one JSON array, so no
choice of file name can make two different field lists sign the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from pathlib import Path

from app.platform.privatefiles import create_private_file, read_private_file

log = logging.getLogger(__name__)

SIGNING_KEY_FILE = ".signing-key"
SIGNING_KEY_BYTES = 32
MIN_CONFIGURED_KEY_LENGTH = 32


def sign(signing_key: bytes, fields: list[str | int]) -> str:
    """Return the URL-safe base64 HMAC-SHA256 of the fields, without padding."""
    message = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    digest = hmac.new(signing_key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def is_valid_signature(signing_key: bytes, fields: list[str | int], signature: str) -> bool:
    """Return whether `signature` signs the fields, comparing in constant time."""
    expected = sign(signing_key, fields)
    return hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace"))


def signing_key_from(configured: str, directory: Path) -> bytes:
    """Return the configured signing key, or else the random key kept in `directory`."""
    if configured:
        if len(configured) < MIN_CONFIGURED_KEY_LENGTH:
            raise ValueError(
                f"STORAGE_SIGNING_KEY must be at least {MIN_CONFIGURED_KEY_LENGTH} characters: got {len(configured)}"
            )
        return configured.encode("utf-8")
    return load_or_create_signing_key(directory / SIGNING_KEY_FILE)


def load_or_create_signing_key(path: Path) -> bytes:
    """Load the random signing key at `path`, creating it with mode 0600 when it is missing.

    Processes that start together end up with the same key, because the file appears with an
    atomic link of a complete private file, and a process that loses the race loads the winner's.
    """
    try:
        key = read_private_file(path)
    except FileNotFoundError:
        return _create_signing_key(path)

    if len(key) != SIGNING_KEY_BYTES:
        raise ValueError(f"{path} must contain {SIGNING_KEY_BYTES} bytes: got {len(key)}; delete it to create a new key")
    return key


def _create_signing_key(path: Path) -> bytes:
    key = secrets.token_bytes(SIGNING_KEY_BYTES)
    if not create_private_file(path, key):
        return load_or_create_signing_key(path)

    log.info("created storage signing key", extra={"path": str(path)})
    return key
