"""Delivery of notifications created on any instance to this instance's subscribers, on Postgres.

Every transaction that stores a notification sends `NOTIFY functions_notifications, '<uid>:<id>'`
(see `publish_on_commit`). `NotificationFanout` LISTENs on one dedicated connection, loads the
notifications whose users have a subscription here, and publishes them to the hub in commit
order. The creating instance receives its own notifications the same way, and its hub skips the
after_commit publish, so each notification reaches a subscriber once.

A NOTIFY sent while this instance was not listening is lost. So when the LISTEN connection is
lost and again when LISTEN succeeds, every open stream ends with `unavailable`, and clients
resume with `after_id` from the replay. Between a loss and the next LISTEN, which retries with
backoff of up to 30 s, streams here receive heartbeats but no live notifications.

SQLite has one process and no NOTIFY, so there the after_commit hook alone feeds the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.engine import URL, make_url

from app.notifications import store
from app.notifications.events import NOTIFY_CHANNEL, NotificationHub
from app.platform.db import Database
from app.platform.pubsub import PostgresListener

log = logging.getLogger(__name__)

# Notifications announced but not yet loaded. Past this, the fan-out drops them and interrupts
# every stream, because the database cannot keep up with the loads anyway.
MAX_PENDING = 10_000
# Notifications loaded per query.
LOAD_BATCH_SIZE = 500
# How long startup waits for the first LISTEN before it goes on and the listener keeps retrying.
FIRST_LISTEN_WAIT_SECONDS = 5.0


class NotificationFanout:
    """The LISTEN connection of this process and the task that publishes what it announces to the hub."""

    def __init__(
        self, database: Database, hub: NotificationHub, *, listen_url: URL | None = None, **listener_options: float
    ) -> None:
        """Create the fan-out; it LISTENs on `listen_url`, or on the database's own URL when None."""
        self._database = database
        self._hub = hub
        self._pending: asyncio.Queue[tuple[str, int]] = asyncio.Queue(maxsize=MAX_PENDING)
        self._listener = PostgresListener(
            listen_url or database.engine.url, NOTIFY_CHANNEL, self._announce,
            on_listening=self._interrupt_streams, on_lost=self._interrupt_streams, **listener_options,
        )
        self._worker: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._listener.listening.is_set()

    async def start(self, *, wait_seconds: float = FIRST_LISTEN_WAIT_SECONDS) -> None:
        """Feed the hub from NOTIFY and wait up to `wait_seconds` for the first LISTEN."""
        self._hub.delivered_by_notify = True
        self._worker = asyncio.create_task(self._publish_pending(), name="notification-fanout")
        if not await self._listener.start(wait_seconds=wait_seconds):
            log.warning(
                "cross-instance notification delivery is not listening yet; retrying in the background",
                extra={"channel": NOTIFY_CHANNEL},
            )

    async def stop(self) -> None:
        """Stop listening and publishing."""
        await self._listener.stop()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._hub.delivered_by_notify = False

    def _announce(self, payload: str) -> None:
        # The uid may contain ':', the id cannot.
        uid, separator, id_text = payload.rpartition(":")
        if not separator or not id_text.isdigit():
            log.warning("ignoring a malformed notification announcement", extra={"payload": payload[:200]})
            return
        if not self._hub.has_subscriptions(uid):
            # A subscription opened later replays this notification from the table.
            return
        try:
            self._pending.put_nowait((uid, int(id_text)))
        except asyncio.QueueFull:
            dropped = self._pending.qsize()
            while not self._pending.empty():
                self._pending.get_nowait()
            ended = self._hub.interrupt()
            log.error(
                "notification fan-out fell behind; ended every stream",
                extra={"dropped": dropped + 1, "streams_ended": ended, "max_pending": MAX_PENDING},
            )

    def _interrupt_streams(self) -> None:
        ended = self._hub.interrupt()
        if ended:
            log.info("ended streams that may have missed notifications", extra={"streams_ended": ended})

    async def _publish_pending(self) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < LOAD_BATCH_SIZE and not self._pending.empty():
                batch.append(self._pending.get_nowait())

            try:
                async with self._database.unit_of_work() as session:
                    notifications = await store.get_notifications(session, {notification_id for _, notification_id in batch})
            except Exception:  # noqa: BLE001 - this task must outlive any failed load
                uids = {uid for uid, _ in batch}
                ended = self._hub.interrupt(uids)
                log.exception(
                    "loading announced notifications failed; ended their streams",
                    extra={"notifications": len(batch), "streams_ended": ended},
                )
                continue

            # Ids are in commit order per user, which is the order that matters to each stream.
            # A notification deleted since it was announced is missing and skipped.
            for notification in notifications:
                self._hub.publish(notification)


async def start_fanout(database: Database, hub: NotificationHub, *, listen_url: str = "") -> NotificationFanout | None:
    """Start feeding `hub` from every instance's notifications on Postgres; return None where it does not apply.

    The fan-out LISTENs on `listen_url` (DATABASE_LISTEN_URL), else on the database's own URL.
    SQLite needs no fan-out. Behind a transaction-mode pooler without `listen_url`, LISTEN does
    not work, so the hub receives only this instance's notifications, and a WARNING is logged.
    """
    if database.engine.dialect.name != "postgresql":
        return None
    if database.uses_pooler and not listen_url:
        log.warning(
            "DATABASE_URL is a transaction-mode pooler, where LISTEN does not work: Subscribe streams "
            "receive only notifications created through this instance. Set DATABASE_LISTEN_URL to a "
            "direct or session-mode URL of the same database for delivery across instances"
        )
        return None
    fanout = NotificationFanout(database, hub, listen_url=make_url(listen_url) if listen_url else None)
    await fanout.start()
    return fanout
