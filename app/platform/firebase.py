"""Firebase Admin: the one adapter that calls Firebase Auth, through the firebase_admin SDK.

firebase_admin blocks on HTTP (requests), so every call runs in a worker thread with a deadline.
A semaphore bounds how many threads the calls hold at once, so a slow Firebase costs callers a
fast `unavailable` instead of the server's whole thread pool. SDK errors become service errors here.

With `firebase_auth_emulator_host` set, the SDK talks to the Auth emulator with its built-in fake
credential, offline. Otherwise it uses Application Default Credentials, loaded on the first call,
so a server without them still starts and only these calls fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from app.platform.auth.tokens import TokenRejected, format_time
from app.platform.context import Principal
from app.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidInput,
    NotFound,
    ServiceError,
    Unavailable,
)

if TYPE_CHECKING:
    from firebase_admin import auth

    from app.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


@functools.cache
def _sdk() -> SimpleNamespace:
    """Import firebase_admin on first use: it adds about 12 MB to a server that may never call it."""
    import firebase_admin
    import google.auth.exceptions
    from firebase_admin import auth, exceptions

    return SimpleNamespace(
        firebase_admin=firebase_admin, auth=auth, exceptions=exceptions, google_auth_exceptions=google.auth.exceptions
    )

# NOTE: defaults chosen for an admin RPC and one revocation lookup per new token, not measured
# under load; they are candidates for settings.
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_CONCURRENCY = 8
# Loading Application Default Credentials can probe the GCE metadata server, so after a failure
# calls fail fast for this long instead of probing again on every request.
CREDENTIALS_RETRY_SECONDS = 60.0
# firebase_admin rejects custom claims whose JSON (json.dumps with default separators) is longer.
MAX_CLAIMS_PAYLOAD_CHARS = 1000

EMULATOR_HOST_VARIABLE = "FIREBASE_AUTH_EMULATOR_HOST"
UNAVAILABLE_MESSAGE = "Firebase Auth is unavailable; retry later"
MISSING_CREDENTIALS_MESSAGE = (
    "Firebase Admin credentials are not configured: set GOOGLE_APPLICATION_CREDENTIALS to a service "
    "account key file, run on Google Cloud, or set FIREBASE_AUTH_EMULATOR_HOST for the Auth emulator"
)

# firebase_admin reads the emulator host from the process environment when an auth client is
# created, so creating clients is serialized while the variable is swapped.
_environment_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class FirebaseUser:
    """The parts of a Firebase Auth user record that this service uses."""

    uid: str
    email: str
    email_verified: bool
    disabled: bool
    custom_claims: dict[str, Any] = field(default_factory=dict)
    # Milliseconds since the epoch, whole seconds: ID tokens authenticated earlier are revoked.
    tokens_valid_after_ms: int = 0


class FirebaseAdmin:
    """Async access to Firebase Auth user management for one Firebase project."""

    def __init__(
        self,
        *,
        project_id: str,
        emulator_host: str = "",
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the adapter; this needs neither credentials nor the network.

        Args:
            emulator_host: `host:port` of the Auth emulator, or empty for the real Firebase Auth.
            timeout_seconds: the longest a call waits, including the wait for a free thread.
            max_concurrency: how many SDK calls may run in worker threads at once.
        """
        if not project_id:
            raise ValueError("project_id must not be empty")
        if emulator_host and not _is_host_and_port(emulator_host):
            raise ValueError(f"FIREBASE_AUTH_EMULATOR_HOST must be host:port: got {emulator_host!r}")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be greater than 0: got {timeout_seconds}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1: got {max_concurrency}")

        self.project_id = project_id
        self.emulator_host = emulator_host
        self._timeout_seconds = timeout_seconds
        self._clock = clock
        self._slots = asyncio.Semaphore(max_concurrency)
        # Called with the uid after each successful revoke_sessions or disable_user, e.g. to drop cached tokens.
        self.revocation_listeners: list[Callable[[str], None]] = []
        # The firebase_admin app is created with the first client (see _auth_client).
        self._app = None
        self._client: auth.Client | None = None
        self._client_lock = threading.Lock()
        self._credentials_retry_at = float("-inf")

    @classmethod
    def from_settings(cls, settings: Settings) -> FirebaseAdmin:
        """Create the adapter for the configured project, in emulator mode when an emulator host is set."""
        return cls(project_id=settings.firebase_project_id, emulator_host=settings.firebase_auth_emulator_host)

    def close(self) -> None:
        """Delete the firebase_admin app and its HTTP session, if a call created them."""
        with self._client_lock:
            if self._app is not None:
                _sdk().firebase_admin.delete_app(self._app)
                self._app = None
                self._client = None

    async def get_user(self, uid: str) -> FirebaseUser:
        """Return the user with this uid.

        Raises:
            NotFound: when no user has this uid.
            Unavailable: when Firebase Auth fails or does not respond in time.
        """
        record = await self._run("get_user", uid, lambda client: client.get_user(uid))
        return _user_from_record(record)

    async def set_roles(self, uid: str, roles: list[str]) -> list[str]:
        """Replace the `roles` custom claim of a user, keeping the other custom claims.

        An empty list removes the claim. Returns the roles now stored.
        """

        def replace_roles(client: auth.Client) -> list[str]:
            # NOTE: Firebase has no conditional update of custom claims, so a claim that another
            # writer sets between this read and the write below is lost.
            claims = dict(client.get_user(uid).custom_claims or {})
            if roles:
                claims["roles"] = list(roles)
            else:
                claims.pop("roles", None)

            payload_chars = len(json.dumps(claims))
            if payload_chars > MAX_CLAIMS_PAYLOAD_CHARS:
                raise InvalidInput(
                    FieldViolation(
                        "roles",
                        f"must fit with the user's other custom claims in {MAX_CLAIMS_PAYLOAD_CHARS} characters "
                        f"of JSON: got {payload_chars} characters",
                    )
                )
            client.set_custom_user_claims(uid, claims or None)
            return list(roles)

        return await self._run("set_roles", uid, replace_roles, field="roles")

    async def revoke_sessions(self, uid: str) -> datetime:
        """Revoke every refresh token of a user; return the instant before which ID tokens are revoked."""

        def revoke(client: auth.Client) -> int:
            client.revoke_refresh_tokens(uid)
            return client.get_user(uid).tokens_valid_after_timestamp

        valid_after_ms = await self._run("revoke_sessions", uid, revoke)
        for listener in self.revocation_listeners:
            listener(uid)
        return datetime.fromtimestamp(valid_after_ms / 1000, UTC)

    async def disable_user(self, uid: str) -> None:
        """Disable a user's account, so Firebase rejects their sign-ins and token refreshes.

        Existing ID tokens stay valid until they expire, unless the verifier checks revocation
        (AUTH_CHECK_REVOKED), which rejects them with USER_DISABLED.

        Raises:
            NotFound: when no user has this uid.
            FailedPrecondition: when Firebase Admin credentials are not configured.
            Unavailable: when Firebase Auth fails or does not respond in time.
        """
        await self._run("disable_user", uid, lambda client: client.update_user(uid, disabled=True))
        # A disabled account is a revocation too: listeners drop the user's cached tokens.
        for listener in self.revocation_listeners:
            listener(uid)

    async def check_revoked(self, principal: Principal) -> None:
        """Reject the token of a principal whose sessions were revoked or whose account is disabled or gone.

        The check compares the token's auth_time with the user's tokens_valid_after time. The Python
        firebase-admin 7.7.0 compares iat instead. A refreshed ID token keeps its auth_time, so this
        check also rejects tokens refreshed after the revocation, which the Auth emulator still issues.

        Raises:
            TokenRejected: reason TOKEN_REVOKED, USER_DISABLED or USER_NOT_FOUND.
            Unavailable: when Firebase Auth fails or does not respond in time.
        """
        try:
            user = await self.get_user(principal.uid)
        except NotFound:
            raise TokenRejected(
                "ID token belongs to a user that no longer exists: sign in again", reason="USER_NOT_FOUND"
            ) from None

        if user.disabled:
            raise TokenRejected("ID token belongs to a disabled user account", reason="USER_DISABLED")
        if principal.auth_time * 1000 < user.tokens_valid_after_ms:
            raise TokenRejected(
                f"ID token was revoked at {format_time(user.tokens_valid_after_ms / 1000)}: sign in again",
                reason="TOKEN_REVOKED",
            )

    async def _run(self, operation: str, uid: str, call: Callable[[auth.Client], T], *, field: str = "uid") -> T:
        """Run an SDK call in a worker thread within the deadline, translating its errors.

        Args:
            field: the request field that an invalid-argument error of Firebase is reported on.
        """
        try:
            async with asyncio.timeout(self._timeout_seconds):
                await self._slots.acquire()
                work = asyncio.ensure_future(asyncio.to_thread(self._call_with_client, call))
                # The slot stays taken until the thread ends, even when the caller stops waiting:
                # it counts threads, and a timed-out call's thread runs on until the SDK gives up.
                work.add_done_callback(self._release_slot)
                return await asyncio.shield(work)
        except TimeoutError as error:
            log.error(
                "Firebase Auth %s did not finish within %s s", operation, self._timeout_seconds,
                exc_info=error, extra={"firebase_operation": operation, "uid": uid},
            )
            raise Unavailable(UNAVAILABLE_MESSAGE, reason="FIREBASE_UNAVAILABLE") from error
        except ServiceError:
            raise
        except Exception as error:
            translated = _translate_sdk_error(error, operation, uid, field)
            if translated is None:
                raise
            raise translated from error

    def _release_slot(self, work: asyncio.Future) -> None:
        self._slots.release()
        # Retrieve the outcome, so that a timed-out call whose result no caller awaits
        # logs no "exception was never retrieved" error.
        if not work.cancelled():
            work.exception()

    def _call_with_client(self, call: Callable[[auth.Client], T]) -> T:
        return call(self._auth_client())

    def _auth_client(self) -> auth.Client:
        """Return the SDK client, creating it on first use; runs in a worker thread."""
        sdk = _sdk()
        with self._client_lock:
            if self._client is not None:
                return self._client
            if self._clock() < self._credentials_retry_at:
                raise FailedPrecondition(MISSING_CREDENTIALS_MESSAGE, reason="FIREBASE_CREDENTIALS_MISSING")

            if self._app is None:
                # A named app of its own, so that no other code's default app or options leak in.
                # The SDK stops its HTTP retries at the same deadline as the caller's wait.
                self._app = sdk.firebase_admin.initialize_app(
                    options={"projectId": self.project_id, "httpTimeout": self._timeout_seconds},
                    name=f"functions-{uuid.uuid4().hex}",
                )
            try:
                with _emulator_environment(self.emulator_host):
                    self._client = sdk.auth.Client(self._app)
            except sdk.google_auth_exceptions.DefaultCredentialsError as error:
                self._credentials_retry_at = self._clock() + CREDENTIALS_RETRY_SECONDS
                log.error("Firebase Admin credentials are not configured: %s", error)
                raise FailedPrecondition(MISSING_CREDENTIALS_MESSAGE, reason="FIREBASE_CREDENTIALS_MISSING") from error
            return self._client


@contextlib.contextmanager
def _emulator_environment(host: str) -> Iterator[None]:
    """Make FIREBASE_AUTH_EMULATOR_HOST equal to the setting while a client is created, then restore it.

    The setting wins over a different value in the process environment.
    """
    with _environment_lock:
        previous = os.environ.get(EMULATOR_HOST_VARIABLE)
        if host:
            os.environ[EMULATOR_HOST_VARIABLE] = host
        else:
            os.environ.pop(EMULATOR_HOST_VARIABLE, None)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(EMULATOR_HOST_VARIABLE, None)
            else:
                os.environ[EMULATOR_HOST_VARIABLE] = previous


def _translate_sdk_error(error: Exception, operation: str, uid: str, field: str) -> ServiceError | None:
    """Return the service error for an SDK error, or None when it is unexpected."""
    sdk = _sdk()
    if isinstance(error, sdk.auth.UserNotFoundError):
        return NotFound(f"user {uid} not found", reason="USER_NOT_FOUND")
    # The SDK checks its arguments before any request and raises ValueError.
    if isinstance(error, sdk.exceptions.InvalidArgumentError | ValueError):
        return InvalidInput(FieldViolation(field, f"was rejected by Firebase Auth: {error}"))
    if isinstance(error, sdk.exceptions.FirebaseError | sdk.google_auth_exceptions.TransportError) and _is_outage(error):
        log.error(
            "Firebase Auth %s failed: %s", operation, type(error).__name__,
            exc_info=error, extra={"firebase_operation": operation, "uid": uid},
        )
        return Unavailable(UNAVAILABLE_MESSAGE, reason="FIREBASE_UNAVAILABLE")
    return None


def _is_outage(error: Exception) -> bool:
    """Return whether an SDK error means Firebase Auth is down, slow or unreachable."""
    sdk = _sdk()
    exceptions = sdk.exceptions
    if isinstance(error, sdk.google_auth_exceptions.TransportError):
        return True
    if isinstance(error, exceptions.UnavailableError | exceptions.DeadlineExceededError | exceptions.InternalError):
        return True
    response = error.http_response
    if response is not None:
        return response.status_code >= 500
    # No HTTP response at all: the request failed in transport.
    return isinstance(error, sdk.exceptions.UnknownError)


def _is_host_and_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and "/" not in host and port.isdigit()


def _user_from_record(record: auth.UserRecord) -> FirebaseUser:
    return FirebaseUser(
        uid=record.uid,
        email=record.email or "",
        email_verified=record.email_verified,
        disabled=record.disabled,
        custom_claims=dict(record.custom_claims or {}),
        tokens_valid_after_ms=record.tokens_valid_after_timestamp,
    )
