"""NotificationService against a real server: unary calls over Connect JSON and gRPC, and
Subscribe over Connect server streaming (HTTP/1.1), gRPC-Web and native gRPC.

Every Subscribe test reads up to the heartbeat that ends the replay before it sends live
notifications, because from then on the server has registered the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import struct
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from functions.notification.v1 import notification_connect, notification_pb2
from functions.user.v1 import user_pb2
from google.protobuf import json_format

from tests.databases import database_url
from tests.e2e.clients import Protocol, RpcError, call
from tests.e2e.conftest import Tokens, server_env
from tests.servers import RunningServer, run_migrations, run_server, start_server

SERVICE = "functions.notification.v1.NotificationService"
UNARY_PROTOCOLS = [Protocol.CONNECT_JSON, Protocol.GRPC]
STREAM_PROTOCOLS = ["connect-json", "grpc-web", "grpc"]
READ_TIMEOUT_SECONDS = 10.0
WELCOME_WAIT_SECONDS = 10.0
# A Connect streaming envelope: one flag byte, then the big-endian length of the message.
ENVELOPE_HEADER = struct.Struct(">BI")
END_STREAM_FLAG = 0x02


@pytest.fixture(scope="module")
def notifications_server(backend, tmp_path_factory, cert_server) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp(f"notifications-{backend}")
    with database_url(backend, directory) as url:
        env = server_env(
            cert_server, url, DEV_KEYS_DIR=str(directory / "dev-keys"), ENABLED_SERVICES="auth,users,notifications"
        )
        run_migrations(env)
        with run_server(env, directory / "server.log") as running:
            yield running


def new_uid() -> str:
    return f"notify-{secrets.token_hex(6)}"


async def call_service(protocol: Protocol, server: RunningServer, method: str, request, response_type, token: str):
    return await call(protocol, server.address, SERVICE, method, request, response_type, token=token)


async def send(server: RunningServer, tokens: Tokens, uid: str, title: str) -> notification_pb2.Notification:
    admin = tokens.mint("notify-admin", roles=["admin"])
    response = await call_service(
        Protocol.CONNECT_JSON, server, "Send", notification_pb2.SendRequest(uid=uid, title=title), notification_pb2.SendResponse, admin
    )
    return response.notification


# Subscribe over each protocol, as an async iterator of SubscribeResponse messages.


async def _connect_json_stream(server: RunningServer, token: str, after_id: int) -> AsyncIterator[notification_pb2.SubscribeResponse]:
    body = json.dumps({"afterId": str(after_id)}).encode()
    headers = {"content-type": "application/connect+json", "connect-protocol-version": "1"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
        async with client.stream(
            "POST", f"{server.url}/{SERVICE}/Subscribe", content=ENVELOPE_HEADER.pack(0, len(body)) + body, headers=headers
        ) as response:
            assert response.status_code == 200
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                while len(buffer) >= ENVELOPE_HEADER.size:
                    flags, length = ENVELOPE_HEADER.unpack_from(buffer)
                    if len(buffer) < ENVELOPE_HEADER.size + length:
                        break
                    payload = buffer[ENVELOPE_HEADER.size : ENVELOPE_HEADER.size + length]
                    buffer = buffer[ENVELOPE_HEADER.size + length :]
                    if flags & END_STREAM_FLAG:
                        error = json.loads(payload).get("error")
                        if error:
                            raise RpcError(error["code"], error.get("message", ""))
                        return
                    yield json_format.Parse(payload, notification_pb2.SubscribeResponse())


async def _grpc_web_stream(server: RunningServer, token: str, after_id: int) -> AsyncIterator[notification_pb2.SubscribeResponse]:
    async with notification_connect.NotificationServiceClient(server.url, protocol=ProtocolType.GRPC_WEB) as client:
        try:
            async for response in client.subscribe(
                notification_pb2.SubscribeRequest(after_id=after_id), headers={"authorization": f"Bearer {token}"}
            ):
                yield response
        except ConnectError as error:
            raise RpcError(error.code.value, error.message) from None


async def _grpc_stream(server: RunningServer, token: str, after_id: int) -> AsyncIterator[notification_pb2.SubscribeResponse]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = channel.unary_stream(
            f"/{SERVICE}/Subscribe",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=notification_pb2.SubscribeResponse.FromString,
        )
        try:
            async for response in stub(
                notification_pb2.SubscribeRequest(after_id=after_id), metadata=[("authorization", f"Bearer {token}")]
            ):
                yield response
        except grpc.aio.AioRpcError as error:
            raise RpcError(error.code().name.lower(), error.details() or "") from None


_STREAMS = {"connect-json": _connect_json_stream, "grpc-web": _grpc_web_stream, "grpc": _grpc_stream}


@contextlib.asynccontextmanager
async def subscribe(protocol: str, server: RunningServer, token: str, after_id: int = 0):
    stream = _STREAMS[protocol](server, token, after_id)
    try:
        yield stream
    finally:
        await stream.aclose()


async def read_replay(stream: AsyncIterator[notification_pb2.SubscribeResponse]) -> list[notification_pb2.Notification]:
    """Read the replayed notifications up to the heartbeat that ends the replay."""
    notifications = []
    while True:
        response = await asyncio.wait_for(anext(stream), READ_TIMEOUT_SECONDS)
        if response.HasField("heartbeat"):
            return notifications
        notifications.append(response.notification)


async def read_notification(stream: AsyncIterator[notification_pb2.SubscribeResponse]) -> notification_pb2.Notification:
    """Read the next notification, skipping heartbeats."""
    while True:
        response = await asyncio.wait_for(anext(stream), READ_TIMEOUT_SECONDS)
        if response.HasField("notification"):
            return response.notification


@pytest.mark.parametrize("protocol", STREAM_PROTOCOLS)
async def test_subscribe_replays_streams_and_resumes(protocol: str, notifications_server: RunningServer, tokens: Tokens) -> None:
    uid = new_uid()
    token = tokens.mint(uid)
    stored = [await send(notifications_server, tokens, uid, f"stored {index}") for index in range(2)]

    async with subscribe(protocol, notifications_server, token) as stream:
        replayed = await read_replay(stream)
        live = await send(notifications_server, tokens, uid, "live")
        received_live = await read_notification(stream)
    missed = await send(notifications_server, tokens, uid, "sent while disconnected")
    async with subscribe(protocol, notifications_server, token, after_id=received_live.id) as stream:
        resumed = await read_replay(stream)

    assert [n.id for n in replayed] == [n.id for n in stored]
    assert received_live == live
    assert [n.id for n in resumed] == [missed.id]
    assert resumed[0].title == "sent while disconnected"


async def test_subscribe_reaches_every_stream_of_user(notifications_server: RunningServer, tokens: Tokens) -> None:
    uid = new_uid()
    token = tokens.mint(uid)

    async with subscribe("connect-json", notifications_server, token) as first, subscribe("grpc", notifications_server, token) as second:
        await read_replay(first)
        await read_replay(second)
        sent = await send(notifications_server, tokens, uid, "to both")

        assert (await read_notification(first)).id == sent.id
        assert (await read_notification(second)).id == sent.id


async def test_subscribe_limits_streams_per_user(notifications_server: RunningServer, tokens: Tokens) -> None:
    token = tokens.mint(new_uid())

    async with contextlib.AsyncExitStack() as streams:
        for _ in range(5):
            await read_replay(await streams.enter_async_context(subscribe("connect-json", notifications_server, token)))

        with pytest.raises(RpcError) as raised:
            async with subscribe("grpc", notifications_server, token) as extra:
                await read_replay(extra)

    assert raised.value.code == "resource_exhausted"


async def test_subscribe_requires_sign_in(notifications_server: RunningServer) -> None:
    with pytest.raises(RpcError) as raised:
        async with subscribe("connect-json", notifications_server, "") as stream:
            await read_replay(stream)

    assert raised.value.code == "unauthenticated"


@pytest.mark.parametrize("protocol", UNARY_PROTOCOLS)
async def test_unary_calls_work(protocol: Protocol, notifications_server: RunningServer, tokens: Tokens) -> None:
    uid = new_uid()
    token = tokens.mint(uid)
    first = await send(notifications_server, tokens, uid, "first")
    second = await send(notifications_server, tokens, uid, "second")

    listed = await call_service(
        protocol, notifications_server, "ListNotifications", notification_pb2.ListNotificationsRequest(page_size=1),
        notification_pb2.ListNotificationsResponse, token,
    )
    marked = await call_service(
        protocol, notifications_server, "MarkRead", notification_pb2.MarkReadRequest(ids=[first.id]),
        notification_pb2.MarkReadResponse, token,
    )
    unread = await call_service(
        protocol, notifications_server, "GetUnreadCount", notification_pb2.GetUnreadCountRequest(),
        notification_pb2.GetUnreadCountResponse, token,
    )
    unread_listed = await call_service(
        protocol, notifications_server, "ListNotifications", notification_pb2.ListNotificationsRequest(unread_only=True),
        notification_pb2.ListNotificationsResponse, token,
    )

    assert [n.id for n in listed.notifications] == [second.id]
    assert listed.next_page_token
    assert marked.marked_count == 1
    assert unread.unread_count == 1
    assert [n.id for n in unread_listed.notifications] == [second.id]


@pytest.mark.parametrize("protocol", UNARY_PROTOCOLS)
async def test_mark_read_hides_other_users_ids(protocol: Protocol, notifications_server: RunningServer, tokens: Tokens) -> None:
    owner = new_uid()
    theirs = await send(notifications_server, tokens, owner, "private")

    with pytest.raises(RpcError) as raised:
        await call_service(
            protocol, notifications_server, "MarkRead", notification_pb2.MarkReadRequest(ids=[theirs.id]),
            notification_pb2.MarkReadResponse, tokens.mint(new_uid()),
        )

    assert raised.value.code == "not_found"
    assert owner not in raised.value.message


@pytest.mark.parametrize("protocol", UNARY_PROTOCOLS)
async def test_send_requires_admin(protocol: Protocol, notifications_server: RunningServer, tokens: Tokens) -> None:
    uid = new_uid()

    with pytest.raises(RpcError) as raised:
        await call_service(
            protocol, notifications_server, "Send", notification_pb2.SendRequest(uid=uid, title="hi"),
            notification_pb2.SendResponse, tokens.mint(uid),
        )

    assert raised.value.code == "permission_denied"


async def test_send_rejects_empty_title(notifications_server: RunningServer, tokens: Tokens) -> None:
    with pytest.raises(RpcError) as raised:
        await call_service(
            Protocol.CONNECT_JSON, notifications_server, "Send", notification_pb2.SendRequest(uid=new_uid()),
            notification_pb2.SendResponse, tokens.mint("notify-admin", roles=["admin"]),
        )

    assert raised.value.code == "invalid_argument"
    assert "title" in raised.value.violations


async def test_welcome_arrives_after_first_get_me(notifications_server: RunningServer, tokens: Tokens) -> None:
    uid = new_uid()
    token = tokens.mint(uid)

    await call(Protocol.CONNECT_JSON, notifications_server.address, "functions.user.v1.UserService", "GetMe",
               user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)

    # The relay delivers UserCreated asynchronously, polling every half second.
    deadline = time.monotonic() + WELCOME_WAIT_SECONDS
    while True:
        listed = await call_service(
            Protocol.CONNECT_JSON, notifications_server, "ListNotifications", notification_pb2.ListNotificationsRequest(),
            notification_pb2.ListNotificationsResponse, token,
        )
        if listed.notifications or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert [n.title for n in listed.notifications] == ["Welcome"]


@pytest.mark.parametrize("protocol", STREAM_PROTOCOLS)
async def test_subscribe_ends_unavailable_on_shutdown(protocol: str, tmp_path, cert_server, tokens: Tokens) -> None:
    env = server_env(
        cert_server, f"sqlite+aiosqlite:///{tmp_path / 'functions.db'}", DEV_KEYS_DIR=str(tmp_path / "dev-keys"),
        ENABLED_SERVICES="notifications",
    )
    run_migrations(env)
    server = start_server(env, tmp_path / "server.log")
    try:
        async with subscribe(protocol, server, tokens.mint(new_uid())) as stream:
            await read_replay(stream)
            server.process.send_signal(signal.SIGTERM)

            with pytest.raises(RpcError) as raised:
                await read_notification(stream)
        exit_code = await asyncio.to_thread(server.process.wait, 30)
    finally:
        server.stop(signal.SIGKILL)

    assert raised.value.code == "unavailable"
    assert exit_code == 0


@pytest.mark.parametrize("protocol", UNARY_PROTOCOLS)
async def test_topic_send_reaches_followers_live(protocol: Protocol, notifications_server: RunningServer, tokens: Tokens) -> None:
    topic = f"e2e.{secrets.token_hex(4)}"
    follower, outsider = new_uid(), new_uid()
    follower_token = tokens.mint(follower)
    for _ in range(2):
        await call_service(
            protocol, notifications_server, "FollowTopic", notification_pb2.FollowTopicRequest(topic=topic),
            notification_pb2.FollowTopicResponse, follower_token,
        )
    topics = await call_service(
        protocol, notifications_server, "ListFollowedTopics", notification_pb2.ListFollowedTopicsRequest(),
        notification_pb2.ListFollowedTopicsResponse, follower_token,
    )
    admin = tokens.mint("notify-admin", roles=["admin"])

    async with subscribe("grpc" if protocol is Protocol.GRPC else "connect-json", notifications_server, follower_token) as stream:
        await read_replay(stream)
        response = await call_service(
            protocol, notifications_server, "Send", notification_pb2.SendRequest(topic=topic, title="Maintenance", body="Tonight"),
            notification_pb2.SendResponse, admin,
        )
        received = await read_notification(stream)
    outsider_list = await call_service(
        protocol, notifications_server, "ListNotifications", notification_pb2.ListNotificationsRequest(),
        notification_pb2.ListNotificationsResponse, tokens.mint(outsider),
    )
    await call_service(
        protocol, notifications_server, "UnfollowTopic", notification_pb2.UnfollowTopicRequest(topic=topic),
        notification_pb2.UnfollowTopicResponse, follower_token,
    )
    after_unfollow = await call_service(
        protocol, notifications_server, "Send", notification_pb2.SendRequest(topic=topic, title="Nobody"),
        notification_pb2.SendResponse, admin,
    )

    assert list(topics.topics) == [topic]
    assert response.recipient_count == 1
    assert not response.HasField("notification")
    assert (received.uid, received.title, received.body, received.topic) == (follower, "Maintenance", "Tonight", topic)
    assert list(outsider_list.notifications) == []
    assert after_unfollow.recipient_count == 0


@pytest.mark.parametrize(
    ("request_fields", "field", "problem"),
    [
        ({"uid": "someone", "topic": "news", "title": "Hi"}, "topic", "must be empty when uid is set"),
        ({"title": "Hi"}, "uid", "must be set, or topic must be"),
        ({"topic": "Not A Topic", "title": "Hi"}, "topic", "lower-case letters"),
    ],
)
async def test_send_names_the_wrong_recipient_field(
    request_fields: dict[str, str], field: str, problem: str, notifications_server: RunningServer, tokens: Tokens
) -> None:
    with pytest.raises(RpcError) as raised:
        await call_service(
            Protocol.CONNECT_JSON, notifications_server, "Send", notification_pb2.SendRequest(**request_fields),
            notification_pb2.SendResponse, tokens.mint("notify-admin", roles=["admin"]),
        )

    assert raised.value.code == "invalid_argument"
    assert problem in raised.value.violations[field]


async def test_follow_topic_refuses_invalid_names(notifications_server: RunningServer, tokens: Tokens) -> None:
    with pytest.raises(RpcError) as raised:
        await call_service(
            Protocol.GRPC, notifications_server, "FollowTopic", notification_pb2.FollowTopicRequest(topic="../etc"),
            notification_pb2.FollowTopicResponse, tokens.mint(new_uid()),
        )

    assert raised.value.code == "invalid_argument"
    assert "lower-case letters" in raised.value.violations["topic"]
