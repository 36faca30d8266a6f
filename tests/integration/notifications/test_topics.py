"""Notification topics on SQLite and Postgres: following, sending to every follower, limits and removal.

The databases are shared by the tests of a session, so each test uses its own uids and topics.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime

import pytest
from functions.events.v1 import events_pb2

from app.notifications import logic
from app.notifications.events import (
    NotificationHub,
    user_deleted_consumer,
    welcome_consumer,
)
from app.platform.db import Database
from app.platform.errors import InvalidInput, NotFound, ResourceExhausted
from app.platform.events import Event

TIMEOUT_SECONDS = 5.0


def new_uid() -> str:
    return f"topic-user-{secrets.token_hex(6)}"


def new_topic() -> str:
    return f"news.{secrets.token_hex(4)}"


async def follow(database: Database, uid: str, topic: str) -> None:
    async with database.unit_of_work() as session:
        await logic.follow_topic(session, uid, topic)


async def followed(database: Database, uid: str) -> list[str]:
    async with database.unit_of_work() as session:
        return await logic.list_followed_topics(session, uid)


async def test_send_to_topic_reaches_each_follower_once(database: Database) -> None:
    hub = NotificationHub()
    topic = new_topic()
    followers = sorted(new_uid() for _ in range(3))
    outsider = new_uid()
    for uid in followers:
        await follow(database, uid, topic)
    await follow(database, followers[0], topic)
    subscription = hub.subscribe(followers[1])
    outsider_subscription = hub.subscribe(outsider)

    async with database.unit_of_work() as session:
        sent = await logic.send_to_topic(session, hub, topic, "Release", "Version 2 is out")

    assert sorted(notification.uid for notification in sent) == followers
    assert {notification.topic for notification in sent} == {topic}
    live = await asyncio.wait_for(subscription.queue.get(), TIMEOUT_SECONDS)
    assert (live.uid, live.title, live.topic) == (followers[1], "Release", topic)
    assert outsider_subscription.queue.empty()
    async with database.unit_of_work() as session:
        page = await logic.list_notifications(session, followers[2], 10, "", False)
    assert [(n.title, n.topic) for n in page.notifications] == [("Release", topic)]


async def test_send_to_topic_without_followers_creates_nothing(database: Database) -> None:
    async with database.unit_of_work() as session:
        sent = await logic.send_to_topic(session, NotificationHub(), new_topic(), "Nobody listens", "")

    assert sent == []


async def test_unfollow_stops_delivery(database: Database) -> None:
    uid, topic = new_uid(), new_topic()
    await follow(database, uid, topic)

    async with database.unit_of_work() as session:
        await logic.unfollow_topic(session, uid, topic)
        await logic.unfollow_topic(session, uid, topic)
        sent = await logic.send_to_topic(session, NotificationHub(), topic, "Gone", "")

    assert sent == []
    assert await followed(database, uid) == []


async def test_followed_topics_are_listed_in_name_order(database: Database) -> None:
    uid = new_uid()
    for topic in ("b-topic", "a-topic", "c.topic"):
        await follow(database, uid, topic)

    assert await followed(database, uid) == ["a-topic", "b-topic", "c.topic"]


async def test_follow_limit_names_the_numbers(database: Database) -> None:
    uid = new_uid()
    for index in range(logic.MAX_FOLLOWED_TOPICS):
        await follow(database, uid, f"topic-{index}")
    await follow(database, uid, "topic-0")

    with pytest.raises(ResourceExhausted) as raised:
        await follow(database, uid, "one-too-many")

    assert f"at most {logic.MAX_FOLLOWED_TOPICS} topics" in raised.value.message
    assert f"follows {logic.MAX_FOLLOWED_TOPICS}" in raised.value.message


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("", "must not be empty"),
        ("t" * 65, "at most 64 characters"),
        ("News", "lower-case letters"),
        ("-news", "starting with a letter or digit"),
        ("news\n", "lower-case letters"),
        ("news/eu", "lower-case letters"),
        ("nouvelles-é", "lower-case letters"),
    ],
)
async def test_invalid_topics_are_refused(database: Database, topic: str, problem: str) -> None:
    for call in (
        lambda session: logic.follow_topic(session, new_uid(), topic),
        lambda session: logic.unfollow_topic(session, new_uid(), topic),
        lambda session: logic.send_to_topic(session, NotificationHub(), topic, "Hello", ""),
    ):
        with pytest.raises(InvalidInput) as raised:
            async with database.unit_of_work() as session:
                await call(session)

        assert [violation.field for violation in raised.value.violations] == ["topic"]
        assert problem in raised.value.violations[0].description


async def test_send_to_topic_checks_title_and_body(database: Database) -> None:
    with pytest.raises(InvalidInput) as raised:
        async with database.unit_of_work() as session:
            await logic.send_to_topic(session, NotificationHub(), "NEWS", "", "bell\x07")

    assert [violation.field for violation in raised.value.violations] == ["topic", "title", "body"]


def user_event(message) -> Event:
    return Event(
        id=secrets.token_hex(8), type=message.DESCRIPTOR.full_name, message=message,
        occurred_at=datetime.now(UTC), actor_uid=message.uid, request_id="", traceparent="",
    )


async def test_deleted_user_stops_following(database: Database) -> None:
    uid, topic = new_uid(), new_topic()
    await follow(database, uid, topic)

    async with database.unit_of_work() as session:
        await user_deleted_consumer().handler(user_event(events_pb2.UserDeleted(uid=uid)), session)
        sent = await logic.send_to_topic(session, NotificationHub(), topic, "After deletion", "")

    assert sent == []
    assert await followed(database, uid) == []


async def test_nothing_is_sent_to_a_deleted_user(database: Database) -> None:
    uid = new_uid()
    async with database.unit_of_work() as session:
        await user_deleted_consumer().handler(user_event(events_pb2.UserDeleted(uid=uid)), session)

    with pytest.raises(NotFound) as raised:
        async with database.unit_of_work() as session:
            await logic.send_notification(session, NotificationHub(), uid, "Too late", "")
    # A UserCreated handled after the deletion sends no welcome and does not fail.
    async with database.unit_of_work() as session:
        await welcome_consumer(NotificationHub()).handler(user_event(events_pb2.UserCreated(uid=uid)), session)
        page = await logic.list_notifications(session, uid, 10, "", False)

    assert raised.value.reason == "RECIPIENT_DELETED"
    assert page.notifications == []


async def test_concurrent_follows_respect_the_limit(database: Database) -> None:
    uid = new_uid()
    attempts = logic.MAX_FOLLOWED_TOPICS + 30

    results = await asyncio.gather(
        *(follow(database, uid, f"race-{index}") for index in range(attempts)), return_exceptions=True
    )

    over_limit = [result for result in results if isinstance(result, ResourceExhausted)]
    assert [result for result in results if isinstance(result, BaseException) and result not in over_limit] == []
    assert len(over_limit) == 30
    assert len(await followed(database, uid)) == logic.MAX_FOLLOWED_TOPICS


async def test_sends_racing_a_deletion_leave_nothing(database: Database) -> None:
    uid = new_uid()

    async def send_once() -> None:
        async with database.unit_of_work() as session:
            await logic.send_notification(session, NotificationHub(), uid, "Racing", "")

    async def delete_user() -> None:
        async with database.unit_of_work() as session:
            await user_deleted_consumer().handler(user_event(events_pb2.UserDeleted(uid=uid)), session)

    results = await asyncio.gather(*(send_once() for _ in range(10)), delete_user(), *(send_once() for _ in range(10)), return_exceptions=True)

    unexpected = [result for result in results if isinstance(result, BaseException) and not isinstance(result, NotFound)]
    async with database.unit_of_work() as session:
        page = await logic.list_notifications(session, uid, 100, "", False)
    assert unexpected == []
    assert page.notifications == []
