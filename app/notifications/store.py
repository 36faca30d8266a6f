"""Queries on the notifications table. Functions take the caller's session and never commit."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import delete, func, insert, literal, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.notifications.model import (
    Notification,
    NotificationRow,
    RemovedRecipientRow,
    TopicFollowerRow,
    notification_from_row,
)
from app.platform.db import insert_ignoring_conflicts, lock_for_writing


async def add_notification(session: AsyncSession, uid: str, title: str, body: str, create_time: datetime) -> Notification:
    """Insert a notification and return it with its new id.

    On Postgres the insert first takes a transaction-scoped advisory lock on the uid. Ids come from
    a sequence, and without the lock two concurrent transactions could commit a user's ids out of
    order, so a subscriber resuming after the larger id would miss the smaller one. With the lock,
    a user's notifications commit in id order. SQLite allows one writer at a time, which gives the
    same order.
    """
    if session.get_bind().dialect.name == "postgresql":
        # hashtext collisions only make two users' inserts wait for each other.
        await session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:uid))"), {"uid": uid})

    statement = (
        insert(NotificationRow)
        .values(uid=uid, title=title, body=body, create_time=create_time, read_time=None)
        .returning(NotificationRow.id)
    )
    notification_id = (await session.execute(statement)).scalar_one()
    return Notification(id=notification_id, uid=uid, title=title, body=body, create_time=create_time)


async def add_topic_notifications(
    session: AsyncSession, topic: str, title: str, body: str, create_time: datetime
) -> list[Notification]:
    """Insert a notification for every follower of `topic` and return them in id order.

    On Postgres the followers' advisory locks (see `add_notification`) are taken first, in the
    order of their lock keys. Two topic sends that share followers then take those locks in the
    same order, so they cannot deadlock each other.
    """
    if session.get_bind().dialect.name == "postgresql":
        keys = select(func.hashtext(TopicFollowerRow.uid).label("key")).where(TopicFollowerRow.topic == topic).distinct()
        keys_in_order = keys.order_by(text("key")).subquery()
        await session.execute(select(func.count(func.pg_advisory_xact_lock(keys_in_order.c.key))))

    rows = select(
        TopicFollowerRow.uid,
        literal(title, NotificationRow.title.type),
        literal(body, NotificationRow.body.type),
        literal(create_time, NotificationRow.create_time.type),
        literal(topic, NotificationRow.topic.type),
    ).where(TopicFollowerRow.topic == topic).order_by(TopicFollowerRow.uid)
    statement = (
        insert(NotificationRow)
        .from_select(["uid", "title", "body", "create_time", "topic"], rows)
        .returning(NotificationRow.id, NotificationRow.uid)
    )
    created = sorted((await session.execute(statement)).all())
    return [
        Notification(id=notification_id, uid=uid, title=title, body=body, create_time=create_time, topic=topic)
        for notification_id, uid in created
    ]


async def lock_follower(session: AsyncSession, uid: str) -> None:
    """Serialize changes to the topics of `uid` until the transaction ends."""
    await lock_for_writing(session, f"topics:{uid}", TopicFollowerRow)


async def follow_topic(session: AsyncSession, uid: str, topic: str, create_time: datetime) -> bool:
    """Make `uid` a follower of `topic`; return False when it already was."""
    statement = insert_ignoring_conflicts(session, TopicFollowerRow, {"topic": topic, "uid": uid, "create_time": create_time})
    return (await session.execute(statement)).rowcount == 1


async def unfollow_topic(session: AsyncSession, uid: str, topic: str) -> bool:
    """Stop `uid` following `topic`; return False when it did not."""
    statement = delete(TopicFollowerRow).where(TopicFollowerRow.uid == uid, TopicFollowerRow.topic == topic)
    return (await session.execute(statement)).rowcount == 1


async def list_followed_topics(session: AsyncSession, uid: str) -> list[str]:
    """Return the topics `uid` follows, in name order."""
    statement = select(TopicFollowerRow.topic).where(TopicFollowerRow.uid == uid).order_by(TopicFollowerRow.topic)
    return list((await session.execute(statement)).scalars())


async def list_notifications(
    session: AsyncSession, uid: str, *, limit: int, before_id: int | None = None, unread_only: bool = False
) -> list[Notification]:
    """List at most `limit` notifications of `uid`, newest first, with ids below `before_id` when given."""
    statement = select(NotificationRow).where(NotificationRow.uid == uid)
    if before_id is not None:
        statement = statement.where(NotificationRow.id < before_id)
    if unread_only:
        statement = statement.where(NotificationRow.read_time.is_(None))
    statement = statement.order_by(NotificationRow.id.desc()).limit(limit)
    return [notification_from_row(row) for row in (await session.execute(statement)).scalars()]


async def list_notifications_after(session: AsyncSession, uid: str, *, after_id: int, limit: int) -> list[Notification]:
    """List at most `limit` notifications of `uid` with ids above `after_id`, oldest first."""
    statement = (
        select(NotificationRow)
        .where(NotificationRow.uid == uid, NotificationRow.id > after_id)
        .order_by(NotificationRow.id)
        .limit(limit)
    )
    return [notification_from_row(row) for row in (await session.execute(statement)).scalars()]


async def count_unread(session: AsyncSession, uid: str) -> int:
    """Count the unread notifications of `uid`."""
    statement = select(func.count()).where(NotificationRow.uid == uid, NotificationRow.read_time.is_(None))
    return (await session.execute(statement)).scalar_one()


async def find_missing_ids(session: AsyncSession, uid: str, ids: Collection[int]) -> set[int]:
    """Return the ids among `ids` that are not notifications of `uid`."""
    statement = select(NotificationRow.id).where(NotificationRow.uid == uid, NotificationRow.id.in_(ids))
    found = set((await session.execute(statement)).scalars())
    return set(ids) - found


async def mark_read(session: AsyncSession, uid: str, now: datetime, ids: Collection[int] | None = None) -> int:
    """Set the read time of the unread notifications of `uid`, only those in `ids` when given, and return how many."""
    statement = update(NotificationRow).where(NotificationRow.uid == uid, NotificationRow.read_time.is_(None))
    if ids is not None:
        statement = statement.where(NotificationRow.id.in_(ids))
    result = await session.execute(statement.values(read_time=now).execution_options(synchronize_session=False))
    return result.rowcount


async def get_notifications(session: AsyncSession, ids: Collection[int]) -> list[Notification]:
    """Return the notifications among `ids` that still exist, in id order."""
    statement = select(NotificationRow).where(NotificationRow.id.in_(ids)).order_by(NotificationRow.id)
    return [notification_from_row(row) for row in (await session.execute(statement)).scalars()]


async def lock_recipient(session: AsyncSession, uid: str) -> None:
    """Serialize the notifications of `uid` and their removal until the transaction ends.

    On Postgres it is the lock that `add_notification` takes. So a send that found the recipient
    not removed commits before a removal starts, or else finds the removal recorded.
    """
    await lock_for_writing(session, uid, NotificationRow)


async def is_removed_recipient(session: AsyncSession, uid: str) -> bool:
    """Return whether `uid` belongs to a deleted user."""
    statement = select(RemovedRecipientRow.uid).where(RemovedRecipientRow.uid == uid)
    return (await session.execute(statement)).first() is not None


async def remove_user_notifications(session: AsyncSession, uid: str, remove_time: datetime) -> int:
    """Delete every notification and topic subscription of a user and record the user as removed.

    Return how many notifications there were.
    """
    await lock_recipient(session, uid)
    await session.execute(insert_ignoring_conflicts(session, RemovedRecipientRow, {"uid": uid, "remove_time": remove_time}))
    await session.execute(delete(TopicFollowerRow).where(TopicFollowerRow.uid == uid))
    result = await session.execute(delete(NotificationRow).where(NotificationRow.uid == uid))
    return result.rowcount
