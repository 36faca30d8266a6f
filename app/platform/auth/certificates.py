"""The public keys that sign Firebase ID tokens, fetched and cached without blocking the event loop.

The document is Google's format: a JSON object mapping each key id (`kid`) to a PEM X.509
certificate. It comes from `https://` or `http://` (tests serve it over loopback), cached for the
response's `Cache-Control: max-age`, or from a `file://` URL (the local development key pair),
re-read when its modification time changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from app.platform.auth.tokens import (
    CertificatesUnavailable,
    TokenRejected,
    describe_value,
)

logger = logging.getLogger(__name__)

# A response without max-age is still cached this long, so verification never fetches per request.
FALLBACK_MAX_AGE_SECONDS = 60.0
# A file:// document is checked for a new modification time this often.
FILE_RECHECK_SECONDS = 60.0
# After a failed fetch, callers get the failure (or stale keys) without a new request for this long,
# so an outage does not turn every incoming request into an outgoing one.
FAILURE_MEMORY_SECONDS = 1.0
# An unknown kid may mean Google rotated its keys: refetch, but at most once per interval, because
# anyone can send a token with a made-up kid.
ROTATION_REFETCH_SECONDS = 5.0
# When the cache has expired and the refetch fails, keep verifying with the cached keys for at most
# this long after their max-age, with a WARNING per failed attempt. A short outage of the
# certificate endpoint then fails no call, and a key Google has withdrawn stays trusted for at most
# an hour longer.
STALE_GRACE_SECONDS = 3600.0

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _FileState:
    """A file's modification time, and its bytes, which are None when the time did not change."""

    mtime_ns: int
    body: bytes | None


class CertificateSource:
    """The RSA public keys that sign ID tokens, by kid, from one certificate URL."""

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("https", "http", "file"):
            raise ValueError(f"certificate URL must start with https://, http:// or file://: got {url!r}")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be greater than 0: got {timeout_seconds}")

        self._url = url
        self._is_file = scheme == "file"
        self._timeout_seconds = timeout_seconds
        self._owns_client = client is None and not self._is_file
        self._client = client if client is not None or self._is_file else httpx.AsyncClient(timeout=timeout_seconds)
        self._clock = clock
        # Serializes fetches: callers that arrive during a fetch wait for it and then reuse its
        # result, so a cold cache costs one request however many callers there are.
        self._lock = asyncio.Lock()

        self._keys: dict[str, RSAPublicKey] = {}
        self._generation = 0
        self._fresh_until = float("-inf")
        self._stale_until = float("-inf")
        self._failed_until = float("-inf")
        self._last_attempt = float("-inf")
        self._file_mtime_ns: int | None = None

    async def public_key(self, kid: str) -> RSAPublicKey:
        """Return the public key with this kid, fetching the certificates when the cache is stale.

        Raises:
            TokenRejected: reason UNKNOWN_KID, when no current certificate has this kid.
            CertificatesUnavailable: when the certificates cannot be fetched and no usable copy
                is cached.
        """
        generation = self._generation
        keys = await self._load_keys()
        key = keys.get(kid)
        if key is None:
            keys = await self._load_keys(rotation_of=generation)
            key = keys.get(kid)

        if key is None:
            raise TokenRejected(
                f"ID token kid must name a current signing certificate: got {describe_value(kid)}. "
                "Get a fresh token from the client SDK and retry",
                reason="UNKNOWN_KID",
            )
        return key

    async def aclose(self) -> None:
        """Close the HTTP client when this source created it."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    async def _load_keys(self, *, rotation_of: int | None = None) -> dict[str, RSAPublicKey]:
        """Return the cached keys, refreshing them first when they are due.

        With `rotation_of` (the generation the caller looked at), refresh even a fresh cache,
        unless another caller refreshed since or the last attempt was too recent.
        """
        async with self._lock:
            now = self._clock()
            if rotation_of is None:
                if now < self._fresh_until:
                    return self._keys
            else:
                if self._generation != rotation_of or now < self._last_attempt + ROTATION_REFETCH_SECONDS:
                    return self._keys

            if now < self._failed_until:
                return self._usable_keys_or_raise(now)

            self._last_attempt = now
            try:
                await self._refresh(now)
            except CertificatesUnavailable as error:
                # Counted from the end of the attempt: callers queued behind a fetch that timed
                # out must get the failure at once instead of each waiting for a fetch of its own.
                now = self._clock()
                self._failed_until = now + FAILURE_MEMORY_SECONDS
                self._log_failure(error, now)
                # After a failed rotation refetch, keys still within their max-age are returned.
                return self._usable_keys_or_raise(now)
            return self._keys

    def _usable_keys_or_raise(self, now: float) -> dict[str, RSAPublicKey]:
        """Return keys within their max-age or the stale grace period, else raise CertificatesUnavailable."""
        if now < self._fresh_until or (self._keys and now < self._stale_until):
            return self._keys
        raise CertificatesUnavailable()

    def _log_failure(self, error: CertificatesUnavailable, now: float) -> None:
        # One line per fetch attempt, and attempts are at least FAILURE_MEMORY_SECONDS apart.
        fields: dict[str, object] = {"certs_url": self._url}
        if self._keys and self._fresh_until <= now < self._stale_until:
            fields["expired_for_seconds"] = round(now - self._fresh_until)
            logger.warning("fetching ID token certificates failed, so the expired copy stays in use: %s", error.detail, extra=fields)
        else:
            logger.warning("fetching ID token certificates failed: %s", error.detail, extra=fields)

    async def _refresh(self, now: float) -> None:
        """Fetch the document and replace the cached keys."""
        if self._is_file:
            state = await self._fetch_file()
            if state.body is not None:
                self._replace_keys(parse_certificates(state.body))
            self._file_mtime_ns = state.mtime_ns
            max_age = FILE_RECHECK_SECONDS
        else:
            body, max_age = await self._fetch_http()
            self._replace_keys(parse_certificates(body))

        self._fresh_until = now + max_age
        self._stale_until = self._fresh_until + STALE_GRACE_SECONDS

    def _replace_keys(self, keys: dict[str, RSAPublicKey]) -> None:
        self._keys = keys
        self._generation += 1
        logger.debug("loaded ID token certificates", extra={"certs_url": self._url, "kids": sorted(keys)})

    async def _fetch_http(self) -> tuple[bytes, float]:
        assert self._client is not None
        try:
            # httpx timeouts bound each phase (connect, each read) separately. This one bounds the
            # whole request, so a server that trickles bytes cannot hold a caller past the timeout.
            async with asyncio.timeout(self._timeout_seconds):
                response = await self._client.get(self._url, timeout=self._timeout_seconds)
        except TimeoutError as error:
            raise CertificatesUnavailable(detail=f"GET timed out after {self._timeout_seconds} s") from error
        except httpx.HTTPError as error:
            raise CertificatesUnavailable(detail=f"GET failed: {type(error).__name__}: {error}") from error

        if response.status_code != 200:
            raise CertificatesUnavailable(detail=f"GET returned HTTP {response.status_code}")
        return response.content, cache_lifetime(response.headers)

    async def _fetch_file(self) -> _FileState:
        path = url2pathname(unquote(urlsplit(self._url).path))
        try:
            return await asyncio.to_thread(_read_file, path, self._file_mtime_ns)
        except OSError as error:
            raise CertificatesUnavailable(detail=f"reading {path} failed: {error}") from error


def _read_file(path: str, known_mtime_ns: int | None) -> _FileState:
    """Stat the file and read it only when its modification time differs from the known one."""
    mtime_ns = os.stat(path).st_mtime_ns
    if mtime_ns == known_mtime_ns:
        return _FileState(mtime_ns, None)
    with open(path, "rb") as file:
        return _FileState(mtime_ns, file.read())


def cache_lifetime(headers: httpx.Headers) -> float:
    """Return how many seconds a response may be cached: max-age minus Age, else the fallback."""
    match = _MAX_AGE.search(headers.get("cache-control", ""))
    if match is None:
        return FALLBACK_MAX_AGE_SECONDS

    age = headers.get("age", "0")
    age_seconds = int(age) if age.isdigit() else 0
    return max(0.0, float(int(match.group(1)) - age_seconds))


def parse_certificates(body: bytes) -> dict[str, RSAPublicKey]:
    """Parse Google's {kid: PEM certificate} document into RSA public keys by kid.

    Raises:
        CertificatesUnavailable: when the body is not such a document or contains no RSA certificate.
    """
    try:
        document = json.loads(body)
    except ValueError as error:
        raise CertificatesUnavailable(detail=f"certificate document is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise CertificatesUnavailable(detail=f"certificate document must be a JSON object: got {type(document).__name__}")

    keys: dict[str, RSAPublicKey] = {}
    for kid, pem in document.items():
        if not isinstance(pem, str):
            logger.warning("skipping certificate that is not a PEM string", extra={"kid": kid})
            continue
        try:
            public_key = x509.load_pem_x509_certificate(pem.encode()).public_key()
        except ValueError as error:
            logger.warning("skipping certificate that does not parse: %s", error, extra={"kid": kid})
            continue
        if not isinstance(public_key, RSAPublicKey):
            logger.warning("skipping certificate without an RSA key", extra={"kid": kid})
            continue
        keys[kid] = public_key

    if not keys:
        raise CertificatesUnavailable(detail="certificate document contains no valid RSA certificate")
    return keys
