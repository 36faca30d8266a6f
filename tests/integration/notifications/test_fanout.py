"""Cross-instance notification delivery over Postgres LISTEN/NOTIFY, with two fan-outs in one process.

Each fan-out has its own hub and LISTEN connection, as two server instances would.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from app.notifications import logic
from app.notifications.events import NOTIFY_CHANNEL, NotificationHub
from app.notifications.fanout import NotificationFanout, start_fanout
from app.notifications.model import Notification
from app.platform.db import Database
from app.platform.errors import Unavailable

DELIVERY_TIMEOUT_SECONDS = 1.0
RECONNECT_TIMEOUT_SECONDS = 5.0
# Short backoff so that reconnect tests finish quickly.
FAST_RECONNECT = {"initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.2}


def new_uid() -> str:
    return f"fanout-{secrets.token_hex(6)}"


async def send(database: Database, hub: NotificationHub, uid: str, title: str = "Hello") -> Notification:
    async with database.unit_of_work() as session:
        return await logic.send_notification(session, hub, uid, title, "")


async def next_queued(queue: asyncio.Queue[Notification | None]) -> Notification | None:
    return await asyncio.wait_for(queue.get(), DELIVERY_TIMEOUT_SECONDS)


async def wait_listening(fanout: NotificationFanout) -> None:
    async with asyncio.timeout(RECONNECT_TIMEOUT_SECONDS):
        while not fanout.listening:
            await asyncio.sleep(0.01)


@pytest.fixture
async def instances(postgres_database: Database) -> AsyncIterator[tuple[NotificationHub, NotificationHub, list[NotificationFanout]]]:
    """Two hubs, each fed by its own started fan-out."""
    hubs = (NotificationHub(), NotificationHub())
    fanouts = [NotificationFanout(postgres_database, hub, **FAST_RECONNECT) for hub in hubs]
    for fanout in fanouts:
        await fanout.start()
    yield hubs[0], hubs[1], fanouts
    for fanout in fanouts:
        await fanout.stop()


async def test_fanout_reaches_other_instance(postgres_database: Database, instances) -> None:
    hub_a, hub_b, _ = instances
    uid = new_uid()
    on_a, on_b = hub_a.subscribe(uid), hub_b.subscribe(uid)

    sent = await send(postgres_database, hub_a, uid)

    assert await next_queued(on_b.queue) == sent
    assert await next_queued(on_a.queue) == sent
    # The creating instance gets it once, from NOTIFY, and not again from the after_commit hook.
    await asyncio.sleep(0.2)
    assert on_a.queue.empty()
    assert on_b.queue.empty()


async def test_fanout_delivers_topic_sends_to_every_follower(postgres_database: Database, instances) -> None:
    hub_a, hub_b, _ = instances
    topic = f"fanout.{secrets.token_hex(4)}"
    followers = [new_uid() for _ in range(3)]
    async with postgres_database.unit_of_work() as session:
        for uid in followers:
            await logic.follow_topic(session, uid, topic)
    subscriptions = {uid: hub_b.subscribe(uid) for uid in followers}

    async with postgres_database.unit_of_work() as session:
        sent = await logic.send_to_topic(session, hub_a, topic, "To all", "")

    by_uid = {notification.uid: notification for notification in sent}
    for uid, subscription in subscriptions.items():
        assert await next_queued(subscription.queue) == by_uid[uid]


async def test_fanout_keeps_commit_order(postgres_database: Database, instances) -> None:
    hub_a, hub_b, _ = instances
    uid = new_uid()
    subscription = hub_b.subscribe(uid)

    sent = [await send(postgres_database, hub_a if index % 2 else hub_b, uid, f"n{index}") for index in range(20)]

    received = [await next_queued(subscription.queue) for _ in sent]
    assert [notification.id for notification in received] == [notification.id for notification in sent]


async def test_fanout_skips_rolled_back(postgres_database: Database, instances) -> None:
    hub_a, hub_b, _ = instances
    uid = new_uid()
    subscription = hub_b.subscribe(uid)

    with pytest.raises(RuntimeError):
        async with postgres_database.unit_of_work() as session:
            await logic.send_notification(session, hub_a, uid, "rolled back", "")
            raise RuntimeError("abort the unit of work")
    committed = await send(postgres_database, hub_a, uid, "committed")

    assert await next_queued(subscription.queue) == committed


async def test_fanout_ignores_malformed_payload(postgres_database: Database, instances) -> None:
    hub_a, hub_b, _ = instances
    uid = new_uid()
    subscription = hub_b.subscribe(uid)

    async with postgres_database.unit_of_work() as session:
        for payload in ("garbage", f"{uid}:", f"{uid}:not-a-number"):
            await session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": NOTIFY_CHANNEL, "payload": payload})
    sent = await send(postgres_database, hub_a, uid)

    assert await next_queued(subscription.queue) == sent


async def test_fanout_follow_streams_remote(postgres_database: Database, instances) -> None:
    hub_a, hub_b, _ = instances
    uid = new_uid()
    stored = await send(postgres_database, hub_a, uid, "stored")
    stream = logic.follow_notifications(postgres_database, hub_b, uid, 0, asyncio.Event(), heartbeat_interval_seconds=30)

    try:
        assert await anext(stream) == stored
        assert isinstance(await anext(stream), logic.Heartbeat)
        live = await send(postgres_database, hub_a, uid, "live")
        assert await asyncio.wait_for(anext(stream), DELIVERY_TIMEOUT_SECONDS) == live
    finally:
        await stream.aclose()


async def test_fanout_reconnect_interrupts_streams(postgres_database: Database, instances) -> None:
    hub_a, hub_b, fanouts = instances
    uid = new_uid()
    stream = logic.follow_notifications(postgres_database, hub_b, uid, 0, asyncio.Event(), heartbeat_interval_seconds=30)
    assert isinstance(await anext(stream), logic.Heartbeat)

    listener_pid = fanouts[1]._listener._connection.get_server_pid()
    async with postgres_database.unit_of_work() as session:
        await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": listener_pid})

    with pytest.raises(Unavailable) as raised:
        await asyncio.wait_for(anext(stream), RECONNECT_TIMEOUT_SECONDS)
    assert raised.value.reason == "LIVE_DELIVERY_INTERRUPTED"

    await wait_listening(fanouts[1])
    missed = await send(postgres_database, hub_a, uid, "sent after reconnect")
    resumed = logic.follow_notifications(postgres_database, hub_b, uid, 0, asyncio.Event(), heartbeat_interval_seconds=30)
    try:
        assert await anext(resumed) == missed
        assert isinstance(await anext(resumed), logic.Heartbeat)
        live = await send(postgres_database, hub_a, uid, "live after reconnect")
        assert await asyncio.wait_for(anext(resumed), DELIVERY_TIMEOUT_SECONDS) == live
    finally:
        await resumed.aclose()


async def test_fanout_stop_restores_local_delivery(postgres_database: Database) -> None:
    hub = NotificationHub()
    fanout = NotificationFanout(postgres_database, hub)
    await fanout.start()
    await fanout.stop()
    uid = new_uid()
    subscription = hub.subscribe(uid)

    sent = await send(postgres_database, hub, uid)

    assert not hub.delivered_by_notify
    assert await next_queued(subscription.queue) == sent


async def test_fanout_skipped_behind_pooler(postgres_database: Database, caplog: pytest.LogCaptureFixture) -> None:
    pooled = Database(postgres_database.engine, uses_pooler=True)
    hub = NotificationHub()

    with caplog.at_level(logging.WARNING, logger="app.notifications.fanout"):
        fanout = await start_fanout(pooled, hub)

    assert fanout is None
    assert not hub.delivered_by_notify
    assert "Set DATABASE_LISTEN_URL to a direct or session-mode URL" in caplog.text


async def test_fanout_skipped_on_sqlite(sqlite_database: Database) -> None:
    hub = NotificationHub()

    assert await start_fanout(sqlite_database, hub) is None
    assert not hub.delivered_by_notify
