"""Bounded concurrency: past MAX_CONCURRENT_REQUESTS calls in flight, new calls fail at once.

Failing fast with `unavailable` lets clients and Fly's proxy retry on another instance with
backoff, instead of queueing behind calls that are already slow. The count is per process and
covers a call from its first byte to its last, so an open server stream (Health/Watch) takes one
slot for as long as it lasts. Probes, metrics and CORS preflights are never counted or rejected.
"""

from __future__ import annotations

import logging
import time

from connectrpc.code import Code

from app.platform.wire import send_error
from app.settings import Settings

log = logging.getLogger(__name__)

OVERLOADED_MESSAGE = "server is overloaded: retry with backoff"
# Rejections are logged at most once per this many seconds, with the count since the last line.
REJECTION_LOG_INTERVAL_SECONDS = 10.0
_UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class OverloadGuardMiddleware:
    """Reply `unavailable` at once when the process already handles its maximum of calls."""

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.max_in_flight = settings.max_concurrent_requests
        self.in_flight = 0
        self._rejected_since_log = 0
        self._last_rejection_log = float("-inf")

    def is_counted(self, scope) -> bool:
        return scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in _UNCOUNTED_PATHS

    async def __call__(self, scope, receive, send) -> None:
        if not self.is_counted(scope):
            await self.app(scope, receive, send)
            return

        # The check and the increment run without an await between them, so no other call
        # on this event loop can take the last slot in between.
        if self.in_flight >= self.max_in_flight:
            self._log_rejection()
            await send_error(scope, send, Code.UNAVAILABLE, OVERLOADED_MESSAGE, reason="OVERLOADED")
            return

        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _log_rejection(self) -> None:
        self._rejected_since_log += 1
        now = time.monotonic()
        if now - self._last_rejection_log < REJECTION_LOG_INTERVAL_SECONDS:
            return
        log.warning(
            "overloaded: %d calls rejected since the last report, %d in flight, MAX_CONCURRENT_REQUESTS=%d",
            self._rejected_since_log, self.in_flight, self.max_in_flight,
            extra={"rejected": self._rejected_since_log, "in_flight": self.in_flight},
        )
        self._rejected_since_log = 0
        self._last_rejection_log = now
