"""Use cases of notifications: send, list, mark read, count unread and follow live.

Functions other than `follow_notifications` work inside the caller's unit of work: they take
the session, never commit, and raise ServiceError subclasses for callers to see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import unicodedata
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app.notifications import store
from app.notifications.events import NotificationHub, Subscription, publish_on_commit
from app.notifications.model import (
    BODY_MAX_LENGTH,
    TITLE_MAX_LENGTH,
    TOPIC_MAX_LENGTH,
    UID_MAX_LENGTH,
    Notification,
)
from app.platform import pagination
from app.platform.db import Database
from app.platform.errors import (
    FieldViolation,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    shown,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
MAX_MARK_READ_IDS = 100
MAX_FOLLOWED_TOPICS = 100
_TOPIC_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# Stored notifications a replay reads per unit of work, so no connection stays checked out while the stream sends.
REPLAY_PAGE_SIZE = 100
# An idle Subscribe stream gets a heartbeat this often, so that proxies and browsers do not close
# it as idle. Health/Watch resends its status at the same interval.
HEARTBEAT_INTERVAL_SECONDS = 15.0
SHUTDOWN_MESSAGE = "server is shutting down: reconnect with the last notification id received"
OVERFLOW_MESSAGE = "the stream fell too far behind new notifications: reconnect with the last notification id received"
INTERRUPTED_MESSAGE = "live delivery was interrupted on this server: reconnect with the last notification id received"
# Allowed in a body besides printable characters.
_BODY_ALLOWED_CONTROLS = frozenset("\n\r\t")


@dataclasses.dataclass(frozen=True, slots=True)
class NotificationPage:
    """One page of ListNotifications: the notifications and the token of the next page, empty on the last."""

    notifications: list[Notification]
    next_page_token: str


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat of a Subscribe stream, sent after the replay and whenever the stream is idle."""

    time: datetime


async def send_notification(
    session: AsyncSession, hub: NotificationHub, uid: str, title: str, body: str, *, now: datetime | None = None
) -> Notification:
    """Store a notification for `uid` and deliver it to that user's subscriptions once the transaction commits."""
    violations = _check_content(title, body)
    if not 0 < len(uid) <= UID_MAX_LENGTH:
        violations.insert(0, FieldViolation("uid", f"must be 1 to {UID_MAX_LENGTH} characters: got {len(uid)}"))
    elif (problem := _check_controls(uid, allowed=frozenset())) is not None:
        violations.insert(0, FieldViolation("uid", problem))
    if violations:
        raise InvalidInput(violations)
    await store.lock_recipient(session, uid)
    if await store.is_removed_recipient(session, uid):
        raise NotFound(f"user {uid} deleted their account: nothing can be sent to it", reason="RECIPIENT_DELETED")

    notification = await store.add_notification(session, uid, title, body, now or datetime.now(UTC))

    await publish_on_commit(session, hub, [notification])
    log.info("notification created", extra={"uid": uid, "notification_id": notification.id})
    return notification


async def send_to_topic(
    session: AsyncSession, hub: NotificationHub, topic: str, title: str, body: str, *, now: datetime | None = None
) -> list[Notification]:
    """Store a notification for every follower of `topic` and deliver them once the transaction commits.

    A topic without followers is not an error: no notification is created.
    """
    violations = _check_content(title, body)
    if (problem := _check_topic(topic)) is not None:
        violations.insert(0, FieldViolation("topic", problem))
    if violations:
        raise InvalidInput(violations)

    notifications = await store.add_topic_notifications(session, topic, title, body, now or datetime.now(UTC))

    await publish_on_commit(session, hub, notifications)
    log.info("topic notification created", extra={"topic": topic, "recipients": len(notifications)})
    return notifications


async def follow_topic(session: AsyncSession, uid: str, topic: str, *, now: datetime | None = None) -> None:
    """Make `uid` a follower of `topic`; following it again changes nothing.

    Raise ResourceExhausted when `uid` already follows MAX_FOLLOWED_TOPICS other topics.
    """
    if (problem := _check_topic(topic)) is not None:
        raise InvalidInput(FieldViolation("topic", problem))
    # Concurrent follows of one user would each count the topics before any of them inserts.
    await store.lock_follower(session, uid)
    followed = await store.list_followed_topics(session, uid)
    if topic in followed:
        return
    if len(followed) >= MAX_FOLLOWED_TOPICS:
        raise ResourceExhausted(
            f"a user may follow at most {MAX_FOLLOWED_TOPICS} topics and {uid} follows {len(followed)}: unfollow one first",
            reason="TOO_MANY_TOPICS",
        )
    await store.follow_topic(session, uid, topic, now or datetime.now(UTC))


async def unfollow_topic(session: AsyncSession, uid: str, topic: str) -> None:
    """Stop `uid` following `topic`; not following it is not an error."""
    if (problem := _check_topic(topic)) is not None:
        raise InvalidInput(FieldViolation("topic", problem))
    await store.unfollow_topic(session, uid, topic)


async def list_followed_topics(session: AsyncSession, uid: str) -> list[str]:
    """Return the topics `uid` follows, in name order."""
    return await store.list_followed_topics(session, uid)


def _check_content(title: str, body: str) -> list[FieldViolation]:
    violations = []
    if not title.strip():
        violations.append(FieldViolation("title", "must not be empty"))
    elif len(title) > TITLE_MAX_LENGTH:
        violations.append(FieldViolation("title", f"must be at most {TITLE_MAX_LENGTH} characters: got {len(title)}"))
    elif (problem := _check_controls(title, allowed=frozenset())) is not None:
        violations.append(FieldViolation("title", problem))
    if len(body) > BODY_MAX_LENGTH:
        violations.append(FieldViolation("body", f"must be at most {BODY_MAX_LENGTH} characters: got {len(body)}"))
    elif (problem := _check_controls(body, allowed=_BODY_ALLOWED_CONTROLS)) is not None:
        violations.append(FieldViolation("body", problem))
    return violations


def _check_topic(topic: str) -> str | None:
    if not topic:
        return "must not be empty"
    if len(topic) > TOPIC_MAX_LENGTH:
        return f"must be at most {TOPIC_MAX_LENGTH} characters: got {len(topic)}"
    if not _TOPIC_PATTERN.fullmatch(topic):
        return f"must be lower-case letters, digits, '.', '_' and '-', starting with a letter or digit: got {topic[:TOPIC_MAX_LENGTH]!r}"
    return None


async def list_notifications(
    session: AsyncSession, uid: str, page_size: int, page_token: str, unread_only: bool
) -> NotificationPage:
    """List the notifications of `uid`, newest first, optionally only the unread ones.

    `page_size` 0 means 50 and values above 100 are capped at 100. `page_token` must come from a
    request with the same `unread_only`.
    """
    if page_size < 0:
        raise InvalidInput(FieldViolation("page_size", f"must not be negative: got {page_size}"))
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    before_id = decode_page_token(page_token, unread_only) if page_token else None

    # Fetching one extra row shows whether another page follows.
    notifications = await store.list_notifications(
        session, uid, limit=limit + 1, before_id=before_id, unread_only=unread_only
    )
    if len(notifications) <= limit:
        return NotificationPage(notifications=notifications, next_page_token="")
    page = notifications[:limit]
    return NotificationPage(notifications=page, next_page_token=encode_page_token(page[-1].id, unread_only))


async def mark_read(
    session: AsyncSession, uid: str, ids: Sequence[int], mark_all: bool, *, now: datetime | None = None
) -> int:
    """Mark the listed notifications of `uid` read, or all of them; return how many were unread.

    An id that is not a notification of `uid` fails the call with NotFound and marks nothing. The
    message is the same whether the id belongs to another user or to no notification at all.
    """
    if mark_all and ids:
        raise InvalidInput(FieldViolation("ids", f"must be empty when all is true: got {len(ids)} ids"))
    if not mark_all and not ids:
        raise InvalidInput(FieldViolation("ids", "must name at least one notification, or set all to true"))
    if len(ids) > MAX_MARK_READ_IDS:
        raise InvalidInput(FieldViolation("ids", f"must contain at most {MAX_MARK_READ_IDS} ids: got {len(ids)}"))
    if (invalid := [value for value in ids if value <= 0]):
        raise InvalidInput(FieldViolation("ids", f"must contain positive ids only: got {invalid[0]}"))
    now = now or datetime.now(UTC)

    if mark_all:
        return await store.mark_read(session, uid, now)
    missing = await store.find_missing_ids(session, uid, set(ids))
    if missing:
        raise NotFound(f"notification {min(missing)} not found")
    return await store.mark_read(session, uid, now, set(ids))


async def get_unread_count(session: AsyncSession, uid: str) -> int:
    """Return how many notifications of `uid` are unread."""
    return await store.count_unread(session, uid)


async def follow_notifications(
    database: Database,
    hub: NotificationHub,
    uid: str,
    after_id: int,
    shutting_down: asyncio.Event,
    *,
    heartbeat_interval_seconds: float = HEARTBEAT_INTERVAL_SECONDS,
) -> AsyncIterator[Notification | Heartbeat]:
    """Yield the stored notifications of `uid` after `after_id` in id order, then new ones as they commit.

    A Heartbeat follows the replay, and another one whenever no notification came for
    `heartbeat_interval_seconds`. The stream raises Unavailable when `shutting_down` is set, when
    the subscription's queue overflowed or when the hub interrupted it, and ResourceExhausted past
    the per-user subscription limit.
    """
    if after_id < 0:
        raise InvalidInput(FieldViolation("after_id", f"must not be negative: got {after_id}"))

    # Subscribing before the replay reads the table means a notification committed during the
    # replay is either in the replay or in the queue, so none is lost.
    subscription = hub.subscribe(uid)
    shutdown_wait = asyncio.ensure_future(shutting_down.wait())
    try:
        last_sent_id = after_id
        while True:
            async with database.unit_of_work() as session:
                page = await store.list_notifications_after(
                    session, uid, after_id=last_sent_id, limit=REPLAY_PAGE_SIZE
                )
            for notification in page:
                yield notification
            if page:
                last_sent_id = page[-1].id
            if len(page) < REPLAY_PAGE_SIZE:
                break
        yield Heartbeat(datetime.now(UTC))

        while True:
            notification = await _next_live(subscription, shutdown_wait, heartbeat_interval_seconds)
            if notification is None:
                yield Heartbeat(datetime.now(UTC))
            elif notification.id > last_sent_id:
                # A user's notifications commit in id order, so a smaller id was committed before
                # the last replay read, which sent it. Skipping it also drops any second live copy.
                yield notification
                last_sent_id = notification.id
    finally:
        shutdown_wait.cancel()
        hub.unsubscribe(subscription)


async def _next_live(
    subscription: Subscription, shutdown_wait: asyncio.Future[object], timeout_seconds: float
) -> Notification | None:
    """Wait for the next live notification; return None after `timeout_seconds` without one."""
    if shutdown_wait.done():
        raise Unavailable(SHUTDOWN_MESSAGE, reason="SHUTTING_DOWN")
    # After an overflow the queued notifications are still sent, then the stream ends, because
    # the ones dropped after them reach the client only through the replay of its next stream.
    if subscription.overflowed and subscription.queue.empty():
        raise Unavailable(OVERFLOW_MESSAGE, reason="SUBSCRIBER_TOO_SLOW")
    if subscription.interrupted and subscription.queue.empty():
        # The hub found the queue full and queued no marker.
        raise Unavailable(INTERRUPTED_MESSAGE, reason="LIVE_DELIVERY_INTERRUPTED")
    if not subscription.queue.empty():
        return _unless_interrupted(subscription.queue.get_nowait())

    next_item = asyncio.ensure_future(subscription.queue.get())
    try:
        done, _ = await asyncio.wait({next_item, shutdown_wait}, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not next_item.done():
            next_item.cancel()
    if next_item in done:
        return _unless_interrupted(next_item.result())
    if shutdown_wait in done:
        raise Unavailable(SHUTDOWN_MESSAGE, reason="SHUTTING_DOWN")
    return None


def _unless_interrupted(item: Notification | None) -> Notification:
    # The hub queues None after the last notification of a subscription it interrupted.
    if item is None:
        raise Unavailable(INTERRUPTED_MESSAGE, reason="LIVE_DELIVERY_INTERRUPTED")
    return item


def encode_page_token(before_id: int, unread_only: bool) -> str:
    """Build the opaque token of the page after the notification `before_id`."""
    return pagination.encode_page_token(before_id, [unread_only])


def decode_page_token(page_token: str, unread_only: bool) -> int:
    """Decode a page token into the id its page starts before.

    Raise InvalidInput when list_notifications did not issue the token or issued it for another `unread_only`.
    """
    before_id = pagination.decode_page_token(page_token, [unread_only], method="ListNotifications", filter_names="unread_only")
    if type(before_id) is not int or before_id <= 0:
        raise InvalidInput(
            FieldViolation("page_token", f"must be a next_page_token returned by ListNotifications: got {shown(page_token)}")
        )
    return before_id


def _check_controls(value: str, *, allowed: frozenset[str]) -> str | None:
    # Cc covers C0, DEL and C1. Zl and Zp are the Unicode line and paragraph separators.
    for index, character in enumerate(value):
        if character not in allowed and unicodedata.category(character) in ("Cc", "Zl", "Zp"):
            return f"must not contain control characters: got U+{ord(character):04X} at index {index}"
    return None
