"""Live delivery of new notifications to Subscribe streams, and the UserCreated consumer.

`NotificationHub` fans notifications out to the subscriptions of this process.
`publish_on_commit` makes a stored notification reach the hubs once its transaction commits, so
a subscriber never receives a notification that a rollback then removes. On SQLite, a single
process, the session's after_commit hook publishes to this process's hub. On Postgres the
transaction also sends `NOTIFY functions_notifications, '<uid>:<id>'`, which the fan-out in
app/notifications/fanout.py turns into hub publishes on every instance. A hub fed that way
(`delivered_by_notify`) gets no after_commit publish, so the creating process delivers each
notification once, in commit order like every other instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import cast

from functions.events.v1 import events_pb2
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.notifications import store
from app.notifications.model import Notification
from app.platform.errors import NotFound, ResourceExhausted
from app.platform.events import Consumer, Event
from app.platform.pubsub import notify

log = logging.getLogger(__name__)

# New notifications a subscription buffers for a stream that has not sent them yet. A stream
# that falls further behind is ended, and its client resumes from the last id it received.
SUBSCRIPTION_QUEUE_SIZE = 100
# Open Subscribe streams per user in one process.
MAX_SUBSCRIPTIONS_PER_USER = 5
WELCOME_CONSUMER_NAME = "notifications.welcome"
USER_DELETED_CONSUMER_NAME = "notifications.user_deleted"
WELCOME_TITLE = "Welcome"
WELCOME_BODY = "Your account is ready."
_PENDING_KEY = "notifications.pending"
# The Postgres channel that carries `<uid>:<id>` of each committed notification to every instance.
NOTIFY_CHANNEL = "functions_notifications"


class Subscription:
    """The live notifications of one Subscribe stream, in commit order."""

    def __init__(self, uid: str, queue_size: int) -> None:
        self.uid = uid
        # None, queued after the last notification, means live delivery was interrupted.
        self.queue: asyncio.Queue[Notification | None] = asyncio.Queue(maxsize=queue_size)
        # Set when the queue was full: the stream has missed notifications and must end.
        self.overflowed = False
        # Set when this process may have missed notifications for the stream, which must end.
        self.interrupted = False


class NotificationHub:
    """The open subscriptions of this process, by uid."""

    def __init__(
        self,
        *,
        queue_size: int = SUBSCRIPTION_QUEUE_SIZE,
        max_subscriptions_per_user: int = MAX_SUBSCRIPTIONS_PER_USER,
    ) -> None:
        self.queue_size = queue_size
        self.max_subscriptions_per_user = max_subscriptions_per_user
        self._subscriptions: defaultdict[str, set[Subscription]] = defaultdict(set)
        # Set when a Postgres fan-out publishes every committed notification to this hub, so the
        # after_commit hook must not publish a second copy.
        self.delivered_by_notify = False

    def subscribe(self, uid: str) -> Subscription:
        """Open a subscription to the new notifications of `uid`, or raise ResourceExhausted past the per-user limit."""
        subscriptions = self._subscriptions[uid]
        if len(subscriptions) >= self.max_subscriptions_per_user:
            raise ResourceExhausted(
                f"user {uid} already has {len(subscriptions)} open Subscribe streams on this server, "
                f"the maximum: close one and retry",
                reason="TOO_MANY_SUBSCRIPTIONS",
            )
        subscription = Subscription(uid, self.queue_size)
        subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Close a subscription; closing it twice is harmless."""
        subscriptions = self._subscriptions.get(subscription.uid)
        if subscriptions is None:
            return
        subscriptions.discard(subscription)
        if not subscriptions:
            del self._subscriptions[subscription.uid]

    def subscription_count(self, uid: str) -> int:
        """Return how many subscriptions `uid` has open."""
        return len(self._subscriptions.get(uid, ()))

    def has_subscriptions(self, uid: str) -> bool:
        """Return whether `uid` has a subscription open in this process."""
        return uid in self._subscriptions

    def interrupt(self, uids: Iterable[str] | None = None) -> int:
        """End the subscriptions of `uids`, or all of them, after their queued notifications; return how many.

        Called when notifications for them may have been lost, so that their clients resume with
        the last id received and the replay fills the gap.
        """
        targets = list(self._subscriptions) if uids is None else [uid for uid in set(uids) if uid in self._subscriptions]
        count = 0
        for uid in targets:
            for subscription in list(self._subscriptions.get(uid, ())):
                subscription.interrupted = True
                self.unsubscribe(subscription)
                # A full queue needs no marker: the stream already ends once it drains the queue.
                with contextlib.suppress(asyncio.QueueFull):
                    subscription.queue.put_nowait(None)
                count += 1
        return count

    def publish(self, notification: Notification) -> None:
        """Queue a committed notification for every subscription of its user, without waiting for any of them."""
        for subscription in list(self._subscriptions.get(notification.uid, ())):
            try:
                subscription.queue.put_nowait(notification)
            except asyncio.QueueFull:
                # Waiting here would hold every other subscriber back, so the slow one is dropped instead.
                subscription.overflowed = True
                self.unsubscribe(subscription)
                log.warning(
                    "subscriber fell behind; ending its stream",
                    extra={"uid": notification.uid, "queue_size": self.queue_size},
                )


# The hub of this server process, shared by NotificationService and the welcome consumer.
process_hub = NotificationHub()


async def publish_on_commit(session: AsyncSession, hub: NotificationHub, notifications: Sequence[Notification]) -> None:
    """Deliver `notifications` to subscribers once the session's transaction commits; drop them on rollback.

    On Postgres the transaction sends a NOTIFY per notification for every instance's fan-out, all
    in one statement. Unless a fan-out feeds `hub`, the after_commit hook also publishes to `hub`
    directly.
    """
    if not notifications:
        return
    if session.get_bind().dialect.name == "postgresql":
        await notify(session, NOTIFY_CHANNEL, [f"{notification.uid}:{notification.id}" for notification in notifications])
        if hub.delivered_by_notify:
            return
    for notification in notifications:
        _publish_after_commit(session, hub, notification)


def _publish_after_commit(session: AsyncSession, hub: NotificationHub, notification: Notification) -> None:
    sync_session = session.sync_session
    pending = sync_session.info.get(_PENDING_KEY)
    if pending is None:
        pending = sync_session.info[_PENDING_KEY] = []
        sqlalchemy_event.listen(sync_session, "after_commit", _publish_pending)
        sqlalchemy_event.listen(sync_session, "after_soft_rollback", _drop_pending)
    pending.append((hub, notification))


def _publish_pending(sync_session: Session) -> None:
    pending = sync_session.info.get(_PENDING_KEY) or []
    sync_session.info[_PENDING_KEY] = []
    for hub, notification in pending:
        hub.publish(notification)


def _drop_pending(sync_session: Session, previous_transaction: object) -> None:
    sync_session.info[_PENDING_KEY] = []


def welcome_consumer(hub: NotificationHub) -> Consumer:
    """Build the consumer that sends every new user a welcome notification."""
    # Imported here because logic imports this module for the hub.
    from app.notifications import logic

    async def send_welcome(event: Event, session: AsyncSession) -> None:
        # The relay hands this consumer UserCreated events only.
        created = cast(events_pb2.UserCreated, event.message)
        try:
            await logic.send_notification(session, hub, created.uid, WELCOME_TITLE, WELCOME_BODY)
        except NotFound:
            # The user was deleted before this consumer got to the event.
            log.info("no welcome for a deleted user", extra={"uid": created.uid})

    return Consumer(name=WELCOME_CONSUMER_NAME, event_types=(events_pb2.UserCreated,), handler=send_welcome)


def user_deleted_consumer() -> Consumer:
    """Build the consumer that removes a deleted user's notifications."""
    async def remove_notifications(event: Event, session: AsyncSession) -> None:
        # The relay hands this consumer UserDeleted events only.
        deleted = cast(events_pb2.UserDeleted, event.message)
        removed = await store.remove_user_notifications(session, deleted.uid, datetime.now(UTC))
        log.info("removed the notifications of a deleted user", extra={"uid": deleted.uid, "count": removed})

    return Consumer(name=USER_DELETED_CONSUMER_NAME, event_types=(events_pb2.UserDeleted,), handler=remove_notifications)
