"""Bounded concurrency: past a limit of calls in flight, new calls fail at once.

Failing fast with `unavailable` lets clients and Fly's proxy retry on another instance with
backoff, instead of queueing behind calls that are already slow. The counts are per process
and cover a call from its first byte to its last. Server-streaming calls (Subscribe,
Health/Watch) last as long as their clients stay, so they have a budget of their own,
MAX_CONCURRENT_STREAMS, and open streams never take the slots of other calls. Requests that are
not RPCs (probes, metrics, CORS preflights, the storage adapter's signed URLs, which limit
their own transfers) are never counted or rejected.
"""

from __future__ import annotations

import logging
import time

from connectrpc.code import Code

from app.platform.wire import method_descriptor, send_error, split_rpc_path
from app.settings import Settings

log = logging.getLogger(__name__)

OVERLOADED_MESSAGE = "server is overloaded: retry with backoff"
STREAMS_EXHAUSTED_MESSAGE = "server has its maximum of open streams: retry with backoff"
# Rejections are logged at most once per this many seconds, with the count since the last line.
REJECTION_LOG_INTERVAL_SECONDS = 10.0


class _Budget:
    """How many calls of one kind are in flight, and how many may be."""

    def __init__(self, setting: str, limit: int, message: str) -> None:
        self.setting = setting
        self.limit = limit
        self.message = message
        self.in_flight = 0
        self.rejected_since_log = 0
        self.last_rejection_log = float("-inf")

    def log_rejection(self) -> None:
        self.rejected_since_log += 1
        now = time.monotonic()
        if now - self.last_rejection_log < REJECTION_LOG_INTERVAL_SECONDS:
            return
        log.warning(
            "overloaded: %d calls rejected since the last report, %d in flight, %s=%d",
            self.rejected_since_log, self.in_flight, self.setting, self.limit,
            extra={"rejected": self.rejected_since_log, "in_flight": self.in_flight, "limit": self.setting},
        )
        self.rejected_since_log = 0
        self.last_rejection_log = now


class OverloadGuardMiddleware:
    """Reply `unavailable` at once when the process already handles its maximum of calls of a kind."""

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.calls = _Budget("MAX_CONCURRENT_REQUESTS", settings.max_concurrent_requests, OVERLOADED_MESSAGE)
        self.streams = _Budget("MAX_CONCURRENT_STREAMS", settings.max_concurrent_streams, STREAMS_EXHAUSTED_MESSAGE)

    @property
    def in_flight(self) -> int:
        """Return how many calls of either kind are in flight."""
        return self.calls.in_flight + self.streams.in_flight

    def budget_of(self, scope) -> _Budget | None:
        """Return the budget a request counts against, or None when it is not counted."""
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            return None
        service, method = split_rpc_path(scope["path"])
        if not service:
            return None
        descriptor = method_descriptor(service, method)
        if descriptor is not None and descriptor.server_streaming:
            return self.streams
        return self.calls

    async def __call__(self, scope, receive, send) -> None:
        budget = self.budget_of(scope)
        if budget is None:
            await self.app(scope, receive, send)
            return

        # The check and the increment run without an await between them, so no other call
        # on this event loop can take the last slot in between.
        if budget.in_flight >= budget.limit:
            budget.log_rejection()
            await send_error(scope, send, Code.UNAVAILABLE, budget.message, reason="OVERLOADED")
            return

        budget.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            budget.in_flight -= 1
