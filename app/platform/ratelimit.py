"""Per-caller rate limits of RPCs, counted by slowapi's Limiter in a `limits` storage.

Each call to `/<service>/<method>` counts against that method's limits for that caller. The
caller is the signed-in uid, else the client IP: Fly-Client-IP when TRUST_FLY_PROXY is set,
else the socket peer. X-Forwarded-For is never read, because any client can set it. A method's
limits come from the `rate_limit` field of its policy option, else from RATE_LIMIT_DEFAULT.

The strategy is the sliding window counter of `limits`. It stores two counters per key, unlike
the moving window, which stores one entry per call (600 per caller and method at the default).
It also weighs the previous window, so a caller cannot spend two full budgets around a window
boundary as the fixed window allows. The price is an approximate count near the boundary.

When the storage fails (Redis down or timing out), calls are allowed: an outage of the limiter
must not take the API down with it, and the overload guard still bounds the load per process.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import time
from dataclasses import dataclass

from connectrpc.code import Code
from google.protobuf import descriptor_pool, duration_pb2
from google.rpc import error_details_pb2
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from slowapi import Limiter

from app.platform.context import principal_var
from app.platform.errors import pack_detail
from app.platform.policy import EXTERNAL_POLICIES, policy_for
from app.platform.wire import header, send_error
from app.settings import Settings

log = logging.getLogger(__name__)

STRATEGY = "sliding-window-counter"
# Bounds each Redis call, which runs in a worker thread so that it never blocks the event loop.
STORAGE_TIMEOUT_SECONDS = 0.5
# After a storage failure, calls skip the storage for this long instead of each waiting on it.
STORAGE_RETRY_SECONDS = 5.0
OUTAGE_WARNING_INTERVAL_SECONDS = 60.0

_SKIPPED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_LIMITED_HTTP_METHODS = frozenset({"GET", "POST"})


@dataclass(frozen=True, slots=True)
class RpcLimits:
    """The limits of one RPC, and the name its counters are kept under."""

    name: str
    limits: tuple[RateLimitItem, ...]


@dataclass(frozen=True, slots=True)
class Throttle:
    """The limit a call exceeded, and the whole seconds until the caller may try again."""

    limit: RateLimitItem
    retry_after_seconds: int


def parse_limits(notation: str, source: str) -> tuple[RateLimitItem, ...]:
    """Parse limits notation ("20/minute", "5/second;100/hour"); `source` names the setting for errors."""
    try:
        return tuple(parse_many(notation))
    except ValueError:
        raise ValueError(
            f"{source} must be in the notation of the limits package, such as '600/minute' "
            f"or '5/second;100/hour': got {notation!r}"
        ) from None


@functools.lru_cache(maxsize=4096)
def rpc_of(path: str) -> tuple[str, str] | None:
    """Return the (service, method) that a request path calls, or None when no served service has that path.

    A method that the service lacks comes back as "*", so that made-up method names share one
    counter per caller instead of each creating a key in the storage.
    """
    service, separator, method = path.removeprefix("/").partition("/")
    if not separator or not service or not method or "/" in method:
        return None
    if f"{service}/{method}" in EXTERNAL_POLICIES:
        return service, method
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return None
    return service, method if method in descriptor.methods_by_name else "*"


def client_ip(scope: dict, trust_fly_proxy: bool) -> str:
    """Return the caller's IP address: Fly-Client-IP when Fly's proxy is trusted, else the socket peer."""
    if trust_fly_proxy:
        forwarded = header(scope, b"fly-client-ip").strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            # Fly's proxy always sets it, so a missing or malformed value means a direct
            # connection, which the socket peer describes.
            pass
    client = scope.get("client")
    return client[0] if client else "unknown"


def caller_key(scope: dict, trust_fly_proxy: bool) -> str:
    """Return whom a call is counted against: `uid:<uid>` when signed in, else `ip:<client ip>`."""
    principal = principal_var.get()
    if principal is not None:
        return f"uid:{principal.uid}"
    return f"ip:{client_ip(scope, trust_fly_proxy)}"


class CallLimiter:
    """Count calls per RPC and caller in the configured storage, and report calls over a limit."""

    def __init__(self, settings: Settings) -> None:
        self.default_limits = parse_limits(settings.rate_limit_default, "RATE_LIMIT_DEFAULT")
        url = settings.rate_limit_storage_url
        self._in_process = url.startswith("memory://")
        storage_options: dict = {"wrap_exceptions": True}
        if not self._in_process:
            storage_options |= {"socket_timeout": STORAGE_TIMEOUT_SECONDS, "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS}
        # The key function serves slowapi's route decorators, which this middleware does not use.
        self._limiter = Limiter(
            key_func=lambda request: "", strategy=STRATEGY, storage_uri=url, storage_options=storage_options
        )
        self._rpc_limits: dict[tuple[str, str], RpcLimits] = {}
        self._skip_storage_until = 0.0
        self._last_outage_warning = -math.inf
        self._failures_since_warning = 0
        self._in_outage = False

    def limits_for(self, service: str, method: str) -> RpcLimits:
        """Return the limits of an RPC: its policy's `rate_limit`, else the default."""
        key = (service, method)
        if key not in self._rpc_limits:
            self._rpc_limits[key] = RpcLimits(f"{service}/{method}", self._declared_limits(service, method))
        return self._rpc_limits[key]

    def _declared_limits(self, service: str, method: str) -> tuple[RateLimitItem, ...]:
        policy = policy_for(service, method)
        if policy is None or not policy.rate_limit:
            return self.default_limits
        try:
            return parse_limits(policy.rate_limit, f"rate_limit of {service}/{method}")
        except ValueError as error:
            # A typo in a proto option must not lift the limit, so the default applies.
            log.error("%s. RATE_LIMIT_DEFAULT applies instead", error)
            return self.default_limits

    async def hit(self, rpc: RpcLimits, caller: str) -> Throttle | None:
        """Count one call; return the limit it exceeded, or None when it may proceed."""
        if time.monotonic() < self._skip_storage_until:
            self._failures_since_warning += 1
            return None
        try:
            if self._in_process:
                throttle = self._hit_storage(rpc, caller)
            else:
                throttle = await asyncio.to_thread(self._hit_storage, rpc, caller)
        except StorageError as error:
            self._record_outage(error)
            return None
        if self._in_outage:
            self._in_outage = False
            log.info("rate limit storage recovered, so limits apply again")
        return throttle

    def _hit_storage(self, rpc: RpcLimits, caller: str) -> Throttle | None:
        strategy = self._limiter.limiter
        for limit in rpc.limits:
            if not strategy.hit(limit, rpc.name, caller):
                stats = strategy.get_window_stats(limit, rpc.name, caller)
                return Throttle(limit, max(1, math.ceil(stats.reset_time - time.time())))
        return None

    def _record_outage(self, error: StorageError) -> None:
        now = time.monotonic()
        self._in_outage = True
        self._skip_storage_until = now + STORAGE_RETRY_SECONDS
        self._failures_since_warning += 1
        if now - self._last_outage_warning < OUTAGE_WARNING_INTERVAL_SECONDS:
            return
        log.warning(
            "rate limit storage failed, so calls are allowed without limits: %s (%d calls unlimited "
            "since the last warning; next warning in %d s at the earliest)",
            error.storage_error if error.storage_error is not None else error,
            self._failures_since_warning,
            OUTAGE_WARNING_INTERVAL_SECONDS,
        )
        self._last_outage_warning = now
        self._failures_since_warning = 0


class RateLimitMiddleware:
    """Reject calls over their method's rate limit, or over the caller's calls in progress, with resource_exhausted.

    Besides the rate, each caller (uid, else client IP) may have MAX_CALLS_PER_CALLER calls and
    streams in progress at once in this process, so that no single caller takes up the process's
    shared budgets (see app.platform.overload).
    """

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.trust_fly_proxy = settings.trust_fly_proxy
        self.limiter = CallLimiter(settings)
        self.max_calls_per_caller = settings.max_calls_per_caller
        self.calls_in_progress: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _LIMITED_HTTP_METHODS
            or scope["path"] in _SKIPPED_PATHS
        ):
            await self.app(scope, receive, send)
            return

        rpc = rpc_of(scope["path"])
        if rpc is None:
            await self.app(scope, receive, send)
            return

        limits = self.limiter.limits_for(*rpc)
        key = caller_key(scope, self.trust_fly_proxy)
        throttle = await self.limiter.hit(limits, key)
        if throttle is not None:
            await send_throttled(scope, send, limits.name, throttle)
            return

        in_progress = self.calls_in_progress.get(key, 0)
        if in_progress >= self.max_calls_per_caller:
            await send_error(
                scope, send, Code.RESOURCE_EXHAUSTED,
                f"too many calls in progress for this caller: {in_progress} of at most {self.max_calls_per_caller}; "
                "wait for one to end",
                reason="TOO_MANY_CALLS_IN_PROGRESS",
            )
            return
        self.calls_in_progress[key] = in_progress + 1
        try:
            await self.app(scope, receive, send)
        finally:
            remaining = self.calls_in_progress[key] - 1
            if remaining:
                self.calls_in_progress[key] = remaining
            else:
                del self.calls_in_progress[key]


async def send_throttled(scope: dict, send, rpc_name: str, throttle: Throttle) -> None:
    """Reply resource_exhausted with Retry-After and google.rpc.RetryInfo."""
    seconds = throttle.retry_after_seconds
    retry_info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))
    await send_error(
        scope,
        send,
        Code.RESOURCE_EXHAUSTED,
        f"rate limit {throttle.limit} exceeded for {rpc_name}: retry in {seconds} s",
        reason="RATE_LIMITED",
        extra_headers=[(b"retry-after", str(seconds).encode())],
        details=[pack_detail(retry_info)],
    )
