"""Call deadlines: a default for calls that carry none, and a statement timeout that bounds SQL.

connectrpc cancels a handler once the client's deadline (`connect-timeout-ms`, `grpc-timeout`)
passes. DeadlineInterceptor adds DEFAULT_DEADLINE_SECONDS to unary and client-streaming calls
that carry no deadline, and puts the deadline in a contextvar. On Postgres, every transaction
then starts with `SET LOCAL statement_timeout`, so the server stops a statement that outlives the
call even when the client-side cancellation never reaches it. SQLite has no statement timeout:
there the cancelled task stops waiting, but the statement runs to its end in aiosqlite's thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.platform.context import current_request_id
from app.platform.errors import error_info
from app.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_SECONDS: float = Settings.model_fields["default_deadline_seconds"].default
MAX_DEADLINE_SECONDS: float = Settings.model_fields["max_deadline_seconds"].default
DEADLINE_EXCEEDED_MESSAGE = "deadline exceeded: the call did not finish within its deadline"

# The call's deadline on the time.monotonic() clock, or None outside a call.
deadline_var: ContextVar[float | None] = ContextVar("deadline", default=None)


def remaining_seconds() -> float | None:
    """Return the seconds left before the current call's deadline, or None when it has none."""
    deadline = deadline_var.get()
    if deadline is None:
        return None
    return deadline - time.monotonic()


def statement_timeout_ms() -> int | None:
    """Return the statement timeout for a transaction started now: the remaining time, at least 1 ms.

    Postgres reads 0 as "no timeout", so a deadline that has already passed still gets 1 ms.
    """
    remaining = remaining_seconds()
    if remaining is None:
        return None
    return max(1, math.ceil(remaining * 1000))


def install_statement_timeout(engine: AsyncEngine) -> None:
    """Start every Postgres transaction opened during a call with the call's remaining time as statement_timeout."""

    @event.listens_for(engine.sync_engine, "begin")
    def set_statement_timeout(connection: Any) -> None:
        timeout_ms = statement_timeout_ms()
        if timeout_ms is None:
            return
        # SET LOCAL lasts until the transaction ends, so a pooled connection returns without it.
        # The value is an int computed here, never caller input.
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {timeout_ms}")


def deadline_exceeded_error() -> ConnectError:
    """Build the error of a call that ran past its deadline."""
    return ConnectError(
        Code.DEADLINE_EXCEEDED, DEADLINE_EXCEEDED_MESSAGE, [error_info("DEADLINE_EXCEEDED", current_request_id())]
    )


class DeadlineInterceptor:
    """Bound each unary and client-streaming call by the client's deadline or the default one.

    A failure raised once the deadline has passed, such as Postgres cancelling the statement,
    reaches the caller as `deadline_exceeded` rather than as the failure's own code.

    NOTE: server-streaming and bidirectional calls get no default deadline, because a stream
    such as Health/Watch is meant to stay open. Only the client's deadline bounds them, and
    their SQL runs without a statement timeout.
    """

    def __init__(self, default_seconds: float = DEFAULT_DEADLINE_SECONDS, max_seconds: float = MAX_DEADLINE_SECONDS) -> None:
        if default_seconds <= 0:
            raise ValueError(f"default_seconds must be positive: got {default_seconds}")
        if max_seconds < default_seconds:
            raise ValueError(f"max_seconds must be at least default_seconds ({default_seconds}): got {max_seconds}")
        self.default_seconds = default_seconds
        self.max_seconds = max_seconds

    async def intercept_unary(
        self, call_next: Callable[[Any, RequestContext], Awaitable[Any]], request: Any, ctx: RequestContext
    ) -> Any:
        return await self._bounded(call_next, request, ctx)

    async def intercept_client_stream(
        self, call_next: Callable[[AsyncIterator[Any], RequestContext], Awaitable[Any]], request: AsyncIterator[Any],
        ctx: RequestContext,
    ) -> Any:
        return await self._bounded(call_next, request, ctx)

    def seconds_for(self, ctx: RequestContext) -> float:
        """Return the seconds the call may run: the client's remaining time, else the default.

        A client's deadline beyond max_seconds is cut to it, so that no caller keeps a slot and
        its buffers for hours.
        """
        client_ms = ctx.timeout_ms
        if client_ms is None:
            return self.default_seconds
        return min(max(client_ms / 1000, 0.0), self.max_seconds)

    async def _bounded(self, call_next: Callable[..., Awaitable[Any]], request: Any, ctx: RequestContext) -> Any:
        seconds = self.seconds_for(ctx)
        deadline = time.monotonic() + seconds
        token = deadline_var.set(deadline)
        try:
            # connectrpc has its own scope at the client's deadline. This one covers calls that
            # carry none, and raises the same code when it fires first.
            async with asyncio.timeout(seconds) as scope:
                return await call_next(request, ctx)
        except TimeoutError as error:
            if not scope.expired():
                raise
            raise deadline_exceeded_error() from error
        except Exception as error:
            if time.monotonic() < deadline:
                raise
            log.debug("call failed after its deadline: %s", type(error).__name__)
            raise deadline_exceeded_error() from error
        finally:
            deadline_var.reset(token)
