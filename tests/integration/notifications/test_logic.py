"""Notifications on SQLite and Postgres: storage, listing, marking read and live following.

The databases are shared by the tests of a session, so each test uses its own uids.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from functions.events.v1 import events_pb2
from sqlalchemy import func, select

from app.notifications import logic, store
from app.notifications.events import (
    WELCOME_CONSUMER_NAME,
    WELCOME_TITLE,
    NotificationHub,
    user_deleted_consumer,
    welcome_consumer,
)
from app.notifications.model import Notification, NotificationRow
from app.platform.db import Database
from app.platform.errors import InvalidInput, NotFound, ResourceExhausted, Unavailable
from app.platform.events import EventRelay, ProcessedEventRow, record_event

TIMEOUT_SECONDS = 5.0


def new_uid() -> str:
    return f"notify-{secrets.token_hex(6)}"


async def send(database: Database, hub: NotificationHub, uid: str, title: str = "Hello", body: str = "") -> Notification:
    async with database.unit_of_work() as session:
        return await logic.send_notification(session, hub, uid, title, body)


async def next_item(stream: AsyncIterator[object]) -> object:
    return await asyncio.wait_for(anext(stream), TIMEOUT_SECONDS)


async def test_ids_increase_per_user(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()

    first = await send(database, hub, uid, "one")
    second = await send(database, hub, uid, "two")

    assert second.id > first.id
    async with database.unit_of_work() as session:
        stored = await store.list_notifications_after(session, uid, after_id=0, limit=10)
    assert [notification.title for notification in stored] == ["one", "two"]
    assert stored[0].create_time == first.create_time


@pytest.mark.parametrize(
    ("uid", "title", "body", "field"),
    [
        ("", "Hello", "", "uid"),
        ("u" * 129, "Hello", "", "uid"),
        ("user\x00", "Hello", "", "uid"),
        ("user", "  ", "", "title"),
        ("user", "t" * 201, "", "title"),
        ("user", "line\nbreak", "", "title"),
        ("user", "Hello", "b" * 2001, "body"),
        ("user", "Hello", "bell\x07", "body"),
    ],
)
async def test_send_rejects_invalid_fields(database: Database, uid: str, title: str, body: str, field: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        async with database.unit_of_work() as session:
            await logic.send_notification(session, NotificationHub(), uid, title, body)

    assert [violation.field for violation in raised.value.violations] == [field]


async def test_list_pages_newest_first(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()
    sent = [await send(database, hub, uid, f"n{index}") for index in range(5)]

    async with database.unit_of_work() as session:
        first = await logic.list_notifications(session, uid, 2, "", False)
        second = await logic.list_notifications(session, uid, 2, first.next_page_token, False)
        third = await logic.list_notifications(session, uid, 2, second.next_page_token, False)

    assert [n.id for n in first.notifications] == [sent[4].id, sent[3].id]
    assert [n.id for n in second.notifications] == [sent[2].id, sent[1].id]
    assert [n.id for n in third.notifications] == [sent[0].id]
    assert third.next_page_token == ""


async def test_list_unread_only(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()
    read, unread = await send(database, hub, uid, "read"), await send(database, hub, uid, "unread")

    async with database.unit_of_work() as session:
        await logic.mark_read(session, uid, [read.id], False)
    async with database.unit_of_work() as session:
        page = await logic.list_notifications(session, uid, 0, "", True)

    assert [n.id for n in page.notifications] == [unread.id]


@pytest.mark.parametrize("token", ["garbage", "v1.!!!", "v1.WzAsZmFsc2Vd"])
async def test_list_rejects_foreign_page_token(database: Database, token: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        async with database.unit_of_work() as session:
            await logic.list_notifications(session, new_uid(), 0, token, False)

    assert raised.value.violations[0].field == "page_token"


async def test_list_rejects_token_of_other_filter(database: Database) -> None:
    token = logic.encode_page_token(10, unread_only=True)

    with pytest.raises(InvalidInput) as raised:
        async with database.unit_of_work() as session:
            await logic.list_notifications(session, new_uid(), 0, token, False)

    assert "same unread_only" in raised.value.violations[0].description


async def test_mark_read_counts_and_repeats(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()
    first, second = await send(database, hub, uid), await send(database, hub, uid)

    async with database.unit_of_work() as session:
        marked = await logic.mark_read(session, uid, [first.id], False)
    async with database.unit_of_work() as session:
        marked_again = await logic.mark_read(session, uid, [first.id], False)
        unread = await logic.get_unread_count(session, uid)

    assert marked == 1
    assert marked_again == 0
    assert unread == 1
    async with database.unit_of_work() as session:
        (latest,) = await store.list_notifications(session, uid, limit=1)
    assert latest.id == second.id
    assert not latest.is_read


async def test_mark_all_read(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()
    for _ in range(3):
        await send(database, hub, uid)

    async with database.unit_of_work() as session:
        marked = await logic.mark_read(session, uid, [], True)
    async with database.unit_of_work() as session:
        unread = await logic.get_unread_count(session, uid)

    assert marked == 3
    assert unread == 0


async def test_mark_read_hides_other_users_ids(database: Database) -> None:
    hub = NotificationHub()
    owner, caller = new_uid(), new_uid()
    callers = await send(database, hub, caller)
    theirs = await send(database, hub, owner)

    with pytest.raises(NotFound) as raised:
        async with database.unit_of_work() as session:
            await logic.mark_read(session, caller, [callers.id, theirs.id], False)

    assert str(raised.value) == f"notification {theirs.id} not found"
    async with database.unit_of_work() as session:
        assert await logic.get_unread_count(session, owner) == 1
        # The whole call failed, so the caller's own notification stays unread too.
        assert await logic.get_unread_count(session, caller) == 1


@pytest.mark.parametrize(
    ("ids", "mark_all"),
    [([], False), ([1], True), ([0], False), ([-3], False), (list(range(1, 102)), False)],
)
async def test_mark_read_rejects_invalid_request(database: Database, ids: list[int], mark_all: bool) -> None:
    with pytest.raises(InvalidInput) as raised:
        async with database.unit_of_work() as session:
            await logic.mark_read(session, new_uid(), ids, mark_all)

    assert raised.value.violations[0].field == "ids"


async def test_hub_publishes_only_after_commit(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()
    subscription = hub.subscribe(uid)

    with pytest.raises(RuntimeError):
        async with database.unit_of_work() as session:
            await logic.send_notification(session, hub, uid, "rolled back", "")
            raise RuntimeError("abort the unit of work")
    assert subscription.queue.empty()

    committed = await send(database, hub, uid, "committed")
    assert subscription.queue.get_nowait() == committed


async def test_hub_limits_subscriptions_per_user() -> None:
    hub = NotificationHub(max_subscriptions_per_user=2)
    uid = new_uid()
    first = hub.subscribe(uid)
    hub.subscribe(uid)

    with pytest.raises(ResourceExhausted):
        hub.subscribe(uid)
    hub.unsubscribe(first)
    hub.subscribe(uid)
    assert hub.subscription_count(uid) == 2


async def test_hub_drops_slow_subscriber_only() -> None:
    hub = NotificationHub(queue_size=2)
    uid = new_uid()
    slow, fast = hub.subscribe(uid), hub.subscribe(uid)
    notifications = [Notification(id=index, uid=uid, title="t", body="", create_time=None) for index in (1, 2, 3)]

    for notification in notifications[:2]:
        hub.publish(notification)
    fast.queue.get_nowait()
    fast.queue.get_nowait()
    hub.publish(notifications[2])

    assert slow.overflowed
    assert not fast.overflowed
    assert fast.queue.get_nowait() == notifications[2]
    assert hub.subscription_count(uid) == 1


async def test_follow_replays_then_streams_live(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()
    before = [await send(database, hub, uid, f"old{index}") for index in range(3)]
    stream = logic.follow_notifications(database, hub, uid, before[0].id, asyncio.Event(), heartbeat_interval_seconds=60)

    replayed = [await next_item(stream), await next_item(stream)]
    caught_up = await next_item(stream)
    live = await send(database, hub, uid, "live")
    received = await next_item(stream)
    await stream.aclose()

    assert replayed == before[1:]
    assert isinstance(caught_up, logic.Heartbeat)
    assert received == live
    assert hub.subscription_count(uid) == 0


async def test_follow_replays_across_pages(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logic, "REPLAY_PAGE_SIZE", 2)
    hub = NotificationHub()
    uid = new_uid()
    sent = [await send(database, hub, uid, f"n{index}") for index in range(5)]
    stream = logic.follow_notifications(database, hub, uid, 0, asyncio.Event(), heartbeat_interval_seconds=60)

    replayed = [await next_item(stream) for _ in sent]
    caught_up = await next_item(stream)
    await stream.aclose()

    assert replayed == sent
    assert isinstance(caught_up, logic.Heartbeat)


async def test_follow_sends_heartbeat_when_idle(database: Database) -> None:
    hub = NotificationHub()
    stream = logic.follow_notifications(database, hub, new_uid(), 0, asyncio.Event(), heartbeat_interval_seconds=0.05)

    caught_up = await next_item(stream)
    idle = await next_item(stream)
    await stream.aclose()

    assert isinstance(caught_up, logic.Heartbeat)
    assert isinstance(idle, logic.Heartbeat)


async def test_follow_skips_live_copies_of_replayed(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = NotificationHub()
    uid = new_uid()
    sent: list[Notification] = []
    original = store.list_notifications_after

    async def commit_then_list(session, uid, *, after_id, limit):
        # Committed after the subscription opened and before the replay reads: the replay sends
        # it and its live copy waits in the queue.
        if not sent:
            sent.append(await send(database, hub, uid, "both"))
        return await original(session, uid, after_id=after_id, limit=limit)

    monkeypatch.setattr(store, "list_notifications_after", commit_then_list)
    stream = logic.follow_notifications(database, hub, uid, 0, asyncio.Event(), heartbeat_interval_seconds=60)

    replayed = await next_item(stream)
    caught_up = await next_item(stream)
    later = await send(database, hub, uid, "later")
    live = await next_item(stream)
    await stream.aclose()

    assert replayed == sent[0]
    assert isinstance(caught_up, logic.Heartbeat)
    assert live == later


async def test_follow_ends_unavailable_on_shutdown(database: Database) -> None:
    hub = NotificationHub()
    shutting_down = asyncio.Event()
    stream = logic.follow_notifications(database, hub, new_uid(), 0, shutting_down, heartbeat_interval_seconds=60)
    await next_item(stream)

    shutting_down.set()

    with pytest.raises(Unavailable) as raised:
        await next_item(stream)
    assert raised.value.reason == "SHUTTING_DOWN"


async def test_follow_ends_unavailable_on_overflow(database: Database) -> None:
    hub = NotificationHub(queue_size=1)
    uid = new_uid()
    stream = logic.follow_notifications(database, hub, uid, 0, asyncio.Event(), heartbeat_interval_seconds=60)
    await next_item(stream)

    first = await send(database, hub, uid, "kept")
    await send(database, hub, uid, "dropped")

    assert await next_item(stream) == first
    with pytest.raises(Unavailable) as raised:
        await next_item(stream)
    assert raised.value.reason == "SUBSCRIBER_TOO_SLOW"


async def test_follow_rejects_negative_after_id(database: Database) -> None:
    stream = logic.follow_notifications(database, NotificationHub(), new_uid(), -1, asyncio.Event())

    with pytest.raises(InvalidInput):
        await next_item(stream)


async def test_welcome_consumer_sends_once(database: Database) -> None:
    hub = NotificationHub()
    uid = new_uid()
    subscription = hub.subscribe(uid)
    async with database.unit_of_work() as session:
        event_id = await record_event(session, events_pb2.UserCreated(uid=uid))
    relay = EventRelay(database, [welcome_consumer(hub)])

    await relay.run_once()
    await relay.run_once()

    async with database.unit_of_work() as session:
        stored = await store.list_notifications(session, uid, limit=10)
        processed = await session.scalar(
            select(func.count()).where(ProcessedEventRow.consumer == WELCOME_CONSUMER_NAME, ProcessedEventRow.event_id == event_id)
        )
        rows = await session.scalar(select(func.count()).where(NotificationRow.uid == uid))
    assert [n.title for n in stored] == [WELCOME_TITLE]
    assert processed == 1
    assert rows == 1
    assert subscription.queue.get_nowait() == stored[0]


async def test_user_deleted_removes_only_that_users_notifications(database: Database) -> None:
    deleted_uid, other_uid = new_uid(), new_uid()
    async with database.unit_of_work() as session:
        for uid in (deleted_uid, deleted_uid, other_uid):
            await store.add_notification(session, uid, "title", "body", datetime.now(UTC))
        await record_event(session, events_pb2.UserDeleted(uid=deleted_uid))
    relay = EventRelay(database, [user_deleted_consumer()])

    await relay.run_once()
    await relay.run_once()

    async with database.unit_of_work() as session:
        left_deleted = await session.scalar(select(func.count()).where(NotificationRow.uid == deleted_uid))
        left_other = await session.scalar(select(func.count()).where(NotificationRow.uid == other_uid))
    assert left_deleted == 0
    assert left_other == 1
