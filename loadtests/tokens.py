"""ID tokens for the simulated users of loadtests/locustfile.py.

A local or development server verifies tokens against the development key pair in DEV_KEYS_DIR,
so each simulated user gets its own token, minted here for the uid `load-<n>` (admins:
`load-admin-<n>` with the role admin). A deployment accepts only ID tokens that Firebase signed,
so those are read from files with one token per line.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import jwt

TOKENS_FILE_VARIABLE = "LOCUST_TOKENS_FILE"
ADMIN_TOKENS_FILE_VARIABLE = "LOCUST_ADMIN_TOKENS_FILE"
ADMIN_ROLE = "admin"
DEV_TOKEN_LIFETIME_SECONDS = 3600
# A minted token is replaced this long before it expires, so that no call carries an expired one.
RENEW_BEFORE_EXPIRY_SECONDS = 300


class Credential(Protocol):
    """The identity of one simulated user."""

    uid: str

    def authorization(self) -> str:
        """Return the value of the authorization header or metadata key."""
        ...


class CredentialSource(Protocol):
    """Hands out one credential per simulated user."""

    has_admins: bool

    def issue(self, *, admin: bool) -> Credential:
        """Return the credential of the next ordinary or admin user."""
        ...


@dataclass
class MintedCredential:
    """A development token that is minted again shortly before it expires."""

    minter: DevTokenMinter
    uid: str
    roles: list[str]
    token: str = ""
    expires_at: float = 0.0

    def authorization(self) -> str:
        if time.time() >= self.expires_at - RENEW_BEFORE_EXPIRY_SECONDS:
            self.token, self.expires_at = self.minter.mint(self.uid, self.roles)
        return f"Bearer {self.token}"


@dataclass
class DevTokenMinter:
    """Mints tokens with the development key pair, as `python -m app dev-token` does."""

    keys_dir: Path
    project_id: str
    keys: object = field(default=None, repr=False)

    def mint(self, uid: str, roles: list[str]) -> tuple[str, float]:
        """Return a token for the uid and the time it expires, in seconds since the epoch."""
        from app.platform.auth import ensure_dev_keys, mint_token

        if self.keys is None:
            self.keys = ensure_dev_keys(self.keys_dir)
        issued_at = int(time.time())
        token = mint_token(
            self.keys,
            project_id=self.project_id,
            uid=uid,
            email=f"{uid}@example.com",
            roles=roles,
            lifetime_seconds=DEV_TOKEN_LIFETIME_SECONDS,
            now=issued_at,
        )
        return token, issued_at + DEV_TOKEN_LIFETIME_SECONDS


class MintedCredentials:
    """Numbers the simulated users and mints a token for each of them."""

    has_admins = True

    def __init__(self, minter: DevTokenMinter) -> None:
        self.minter = minter
        self.serials = itertools.count(1)
        self.lock = threading.Lock()

    def issue(self, *, admin: bool) -> Credential:
        with self.lock:
            serial = next(self.serials)
        if admin:
            return MintedCredential(self.minter, f"load-admin-{serial}", [ADMIN_ROLE])
        return MintedCredential(self.minter, f"load-{serial}", [])


@dataclass(frozen=True)
class FileCredential:
    """An ID token read from a file, which cannot be renewed."""

    uid: str
    token: str

    def authorization(self) -> str:
        return f"Bearer {self.token}"


class FileCredentials:
    """Hands out the tokens of the files in turn, starting again after the last one."""

    def __init__(self, users: list[FileCredential], admins: list[FileCredential]) -> None:
        self.users = itertools.cycle(users)
        self.admins = itertools.cycle(admins) if admins else None
        self.has_admins = bool(admins)
        self.lock = threading.Lock()

    def issue(self, *, admin: bool) -> Credential:
        if admin and self.admins is None:
            raise RuntimeError(f"an admin user needs admin tokens: set {ADMIN_TOKENS_FILE_VARIABLE}")
        with self.lock:
            return next(self.admins if admin else self.users)


def read_tokens(path: Path) -> list[FileCredential]:
    """Read one ID token per line, skipping blank lines and lines that start with #.

    Raises ValueError for a line that is not a JWT or whose token has expired, because every
    call made with it would fail as unauthenticated.
    """
    credentials = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue

        # Only the claims are read here; the server verifies the signature.
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as error:
            raise ValueError(f"line {number} of {path} must be an ID token (a JWT): {error}") from None
        expires_at = claims.get("exp")
        if isinstance(expires_at, int | float) and expires_at <= time.time():
            raise ValueError(
                f"the token on line {number} of {path} expired at {time.ctime(expires_at)}: fetch fresh ID tokens"
            )

        credentials.append(FileCredential(uid=str(claims.get("sub", f"{path.name}:{number}")), token=token))

    if not credentials:
        raise ValueError(f"{path} contains no tokens: expected one ID token per line")
    return credentials


def load_credentials(environ: Mapping[str, str] = os.environ) -> CredentialSource:
    """Choose the token source from the environment: token files if set, else development tokens."""
    tokens_file = environ.get(TOKENS_FILE_VARIABLE, "")
    admin_tokens_file = environ.get(ADMIN_TOKENS_FILE_VARIABLE, "")

    if tokens_file:
        admins = read_tokens(Path(admin_tokens_file)) if admin_tokens_file else []
        return FileCredentials(read_tokens(Path(tokens_file)), admins)
    if admin_tokens_file:
        raise ValueError(
            f"{ADMIN_TOKENS_FILE_VARIABLE} is set without {TOKENS_FILE_VARIABLE}: "
            "set both for a deployment, or neither to mint development tokens"
        )

    from app.settings import Settings

    settings = Settings()
    if not settings.uses_dev_keys:
        raise ValueError(
            f"minting development tokens needs the development key pair: unset FIREBASE_CERTS_URL, "
            f"or set {TOKENS_FILE_VARIABLE} to a file of ID tokens"
        )
    return MintedCredentials(DevTokenMinter(settings.dev_keys_dir, settings.firebase_project_id))
