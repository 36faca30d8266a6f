"""Cross-process signals over Postgres LISTEN/NOTIFY.

Every instance already shares the Postgres database, so LISTEN/NOTIFY carries signals between
instances with no extra service to run, secure and monitor, as Redis pub/sub would need. A
NOTIFY sent inside a transaction is delivered only when that transaction commits, and
notifications from different transactions arrive in commit order (PostgreSQL documentation,
"NOTIFY"). Like Redis pub/sub, it keeps nothing for a listener that is disconnected, so callers
must resynchronize from their tables after a reconnect: `on_listening` runs after every LISTEN
and `on_lost` after every lost connection.
Payloads are limited to 8000 bytes, so they should carry ids rather than records.

LISTEN is bound to one server session, so it does not work through a transaction-mode pooler such as PgBouncer
or Supabase's pooler on port 6543. The listener needs a direct or session-mode URL. NOTIFY,
sent inside an ordinary transaction, works through either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 10.0
# An idle LISTEN connection can die without the socket closing (a NAT or firewall dropping it),
# so the listener runs `SELECT 1` this often and reconnects when it fails.
CHECK_INTERVAL_SECONDS = 10.0
CHECK_TIMEOUT_SECONDS = 5.0
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
APPLICATION_NAME = "functions-listener"

_CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def notify(session: AsyncSession, channel: str, payloads: Sequence[str]) -> None:
    """Send each of `payloads` on `channel` when the session's transaction commits. A rollback discards them.

    With several payloads, their order on the channel is not defined.
    """
    if len(payloads) == 1:
        await session.execute(select(func.pg_notify(channel, payloads[0])))
        return
    await session.execute(
        text("SELECT count(pg_notify(:channel, payload)) FROM unnest(CAST(:payloads AS text[])) AS payload"),
        {"channel": channel, "payloads": list(payloads)},
    )


def asyncpg_dsn(url: URL) -> str:
    """Convert an SQLAlchemy `postgresql+asyncpg` URL into a DSN for `asyncpg.connect`.

    The engine configuration renames libpq's `sslmode` to asyncpg's `ssl` connect argument, and
    asyncpg's DSN parser reads `sslmode`, so the name is changed back.
    """
    query = dict(url.query)
    if "ssl" in query:
        query["sslmode"] = query.pop("ssl")
    return url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


class PostgresListener:
    """One dedicated asyncpg connection that LISTENs on a channel and reconnects with backoff.

    The connection is not taken from the SQLAlchemy pool, because a pooled connection is reset and
    handed to other sessions, which would drop the LISTEN. `on_payload` runs on the event loop for
    each notification, in commit order, and must not block. `on_listening` runs after each
    successful LISTEN, the first one included, because notifications sent while no LISTEN was
    active are lost. `on_lost` runs whenever a connection that was listening is lost.
    """

    def __init__(
        self,
        url: URL,
        channel: str,
        on_payload: Callable[[str], None],
        *,
        on_listening: Callable[[], None],
        on_lost: Callable[[], None] | None = None,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
        check_interval_seconds: float = CHECK_INTERVAL_SECONDS,
        initial_backoff_seconds: float = INITIAL_BACKOFF_SECONDS,
        max_backoff_seconds: float = MAX_BACKOFF_SECONDS,
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._target = f"{url.host}:{url.port or 5432}/{url.database}"
        self.channel = channel
        self._on_payload = on_payload
        self._on_listening = on_listening
        self._on_lost = on_lost
        self._connect_timeout_seconds = connect_timeout_seconds
        self._check_interval_seconds = check_interval_seconds
        self._initial_backoff_seconds = initial_backoff_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._task: asyncio.Task[None] | None = None
        self._connection: asyncpg.Connection | None = None
        self.listening = asyncio.Event()
        self._stopping = False

    async def start(self, *, wait_seconds: float) -> bool:
        """Start listening in the background; return whether LISTEN succeeded within `wait_seconds`.

        When it did not, the listener keeps retrying in the background.
        """
        self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listening.wait(), wait_seconds)
        return self.listening.is_set()

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()
        log.info("stopped listening", extra={"channel": self.channel})

    async def _run(self) -> None:
        backoff_seconds = self._initial_backoff_seconds
        failures = 0
        while True:
            try:
                self._connection = await asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout_seconds,
                    server_settings={"application_name": APPLICATION_NAME},
                )
                await self._listen(self._connection)
                # _listen returns only after LISTEN succeeded and the connection was then lost.
                failures = 0
                backoff_seconds = self._initial_backoff_seconds
                log.warning("LISTEN connection lost; reconnecting", extra={"channel": self.channel, "target": self._target})
            except _CONNECTION_ERRORS as error:
                failures += 1
                log.warning(
                    "LISTEN connection failed: %s; retrying in %.1f s",
                    type(error).__name__, backoff_seconds,
                    extra={"channel": self.channel, "target": self._target, "consecutive_failures": failures},
                )
            finally:
                was_listening = self.listening.is_set()
                self.listening.clear()
                await self._close()
                if was_listening and not self._stopping and self._on_lost is not None:
                    self._on_lost()
            # Jitter keeps instances that lost the database together from reconnecting in step.
            await asyncio.sleep(backoff_seconds * random.uniform(0.5, 1.0))
            backoff_seconds = min(backoff_seconds * 2, self._max_backoff_seconds)

    async def _listen(self, connection: asyncpg.Connection) -> None:
        """LISTEN on `connection` and return once it is lost. Raise when a liveness check fails."""
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        await connection.add_listener(self.channel, self._deliver)
        self.listening.set()
        log.info("listening", extra={"channel": self.channel, "target": self._target})
        self._on_listening()

        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self._check_interval_seconds)
                return
            await connection.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_SECONDS)

    def _deliver(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        try:
            self._on_payload(payload)
        except Exception:  # noqa: BLE001 - one bad payload must not stop the listener
            log.exception("handling a notification failed", extra={"channel": channel})

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await asyncio.wait_for(connection.close(), CHECK_TIMEOUT_SECONDS)
        except _CONNECTION_ERRORS:
            connection.terminate()
