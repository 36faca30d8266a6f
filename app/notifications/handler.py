"""The functions.notification.v1.NotificationService implementation: unpack, call one use case, build the reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from connectrpc.request import RequestContext
from functions.notification.v1 import notification_pb2

from app.notifications import logic
from app.notifications.events import NotificationHub
from app.notifications.model import Notification
from app.platform.context import require_principal
from app.platform.db import Database
from app.platform.errors import FieldViolation, InvalidInput
from app.platform.timestamps import timestamp_of


class NotificationHandler:
    """NotificationService over the notifications table and this process's hub."""

    def __init__(
        self,
        database: Database,
        hub: NotificationHub,
        shutting_down: asyncio.Event,
        *,
        heartbeat_interval_seconds: float = logic.HEARTBEAT_INTERVAL_SECONDS,
    ) -> None:
        self._database = database
        self._hub = hub
        self._shutting_down = shutting_down
        self._heartbeat_interval_seconds = heartbeat_interval_seconds

    async def send(self, request: notification_pb2.SendRequest, ctx: RequestContext, /) -> notification_pb2.SendResponse:
        if request.uid and request.topic:
            raise InvalidInput(FieldViolation("topic", "must be empty when uid is set: send to one user or to one topic"))
        if not request.uid and not request.topic:
            raise InvalidInput(FieldViolation("uid", "must be set, or topic must be: got neither"))

        async with self._database.unit_of_work() as session:
            if request.topic:
                sent = await logic.send_to_topic(session, self._hub, request.topic, request.title, request.body)
                return notification_pb2.SendResponse(recipient_count=len(sent))
            notification = await logic.send_notification(session, self._hub, request.uid, request.title, request.body)

        return notification_pb2.SendResponse(notification=notification_to_proto(notification), recipient_count=1)

    async def follow_topic(
        self, request: notification_pb2.FollowTopicRequest, ctx: RequestContext, /
    ) -> notification_pb2.FollowTopicResponse:
        uid = require_principal().uid

        async with self._database.unit_of_work() as session:
            await logic.follow_topic(session, uid, request.topic)

        return notification_pb2.FollowTopicResponse()

    async def unfollow_topic(
        self, request: notification_pb2.UnfollowTopicRequest, ctx: RequestContext, /
    ) -> notification_pb2.UnfollowTopicResponse:
        uid = require_principal().uid

        async with self._database.unit_of_work() as session:
            await logic.unfollow_topic(session, uid, request.topic)

        return notification_pb2.UnfollowTopicResponse()

    async def list_followed_topics(
        self, request: notification_pb2.ListFollowedTopicsRequest, ctx: RequestContext, /
    ) -> notification_pb2.ListFollowedTopicsResponse:
        uid = require_principal().uid

        async with self._database.unit_of_work() as session:
            topics = await logic.list_followed_topics(session, uid)

        return notification_pb2.ListFollowedTopicsResponse(topics=topics)

    async def list_notifications(
        self, request: notification_pb2.ListNotificationsRequest, ctx: RequestContext, /
    ) -> notification_pb2.ListNotificationsResponse:
        uid = require_principal().uid

        async with self._database.unit_of_work() as session:
            page = await logic.list_notifications(session, uid, request.page_size, request.page_token, request.unread_only)

        return notification_pb2.ListNotificationsResponse(
            notifications=[notification_to_proto(notification) for notification in page.notifications],
            next_page_token=page.next_page_token,
        )

    async def mark_read(self, request: notification_pb2.MarkReadRequest, ctx: RequestContext, /) -> notification_pb2.MarkReadResponse:
        uid = require_principal().uid

        async with self._database.unit_of_work() as session:
            marked_count = await logic.mark_read(session, uid, list(request.ids), request.all)

        return notification_pb2.MarkReadResponse(marked_count=marked_count)

    async def get_unread_count(
        self, request: notification_pb2.GetUnreadCountRequest, ctx: RequestContext, /
    ) -> notification_pb2.GetUnreadCountResponse:
        uid = require_principal().uid

        async with self._database.unit_of_work() as session:
            unread_count = await logic.get_unread_count(session, uid)

        return notification_pb2.GetUnreadCountResponse(unread_count=unread_count)

    async def subscribe(
        self, request: notification_pb2.SubscribeRequest, ctx: RequestContext, /
    ) -> AsyncIterator[notification_pb2.SubscribeResponse]:
        uid = require_principal().uid

        items = logic.follow_notifications(
            self._database, self._hub, uid, request.after_id, self._shutting_down,
            heartbeat_interval_seconds=self._heartbeat_interval_seconds,
        )

        async for item in items:
            if isinstance(item, logic.Heartbeat):
                yield notification_pb2.SubscribeResponse(heartbeat=notification_pb2.Heartbeat(time=timestamp_of(item.time)))
            else:
                yield notification_pb2.SubscribeResponse(notification=notification_to_proto(item))


def notification_to_proto(notification: Notification) -> notification_pb2.Notification:
    """Build the Notification message of a notification."""
    message = notification_pb2.Notification(
        id=notification.id,
        uid=notification.uid,
        title=notification.title,
        body=notification.body,
        create_time=timestamp_of(notification.create_time),
        topic=notification.topic or "",
    )
    if notification.read_time is not None:
        message.read_time.CopyFrom(timestamp_of(notification.read_time))
    return message