"""The shared middleware and interceptors around handlers written for these tests.

The handlers here fail or stream on purpose; everything around them (middleware, interceptors,
codecs, uvicorn on a socket) is the production code path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.server import ConnectASGIApplication, Endpoint
from functions.user.v1 import user_connect, user_pb2
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.routing import Mount

from app.main import platform_middleware
from app.platform.codecs import server_codecs
from app.platform.context import current_principal
from app.platform.interceptors import service_interceptors
from app.platform.policy import EXTERNAL_POLICIES, PUBLIC
from app.settings import Settings
from tests.e2e.conftest import PROJECT_ID
from tests.servers import serve_in_thread

STREAM_SERVICE = "tests.Ticker"
# Served like the ticker but never given a policy, so every call to it must be denied.
UNLISTED_SERVICE = "tests.Unlisted"
STREAM_INTERVAL_SECONDS = 0.4
STREAM_MESSAGES = 4


class BrokenUsers:
    """A UserService whose logic dereferences a row that is missing, as in a real bug."""

    async def get_me(self, request, ctx):
        row = None
        return user_pb2.GetMeResponse(user=user_pb2.User(uid=row.uid))  # AttributeError

    async def get_user(self, request, ctx):
        profiles: dict[str, str] = {}
        return user_pb2.GetUserResponse(user=user_pb2.User(uid=profiles["SELECT * FROM users"]))  # KeyError

    async def update_me(self, request, ctx):
        principal = current_principal()
        return user_pb2.UpdateMeResponse(user=user_pb2.User(uid=principal.uid))

    async def list_users(self, request, ctx):
        return user_pb2.ListUsersResponse()

    async def delete_me(self, request, ctx):
        return user_pb2.DeleteMeResponse()


class Ticker:
    """Streams one health message per interval: a stand-in for any server stream."""

    async def watch(self, request, ctx) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        for _ in range(STREAM_MESSAGES):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
            await asyncio.sleep(STREAM_INTERVAL_SECONDS)


class TickerApplication(ConnectASGIApplication[Ticker]):
    def __init__(self, service: Ticker, service_name: str = STREAM_SERVICE, **options) -> None:
        self.service_name = service_name
        method = MethodInfo(
            name="Watch", service_name=service_name, input=health_pb2.HealthCheckRequest,
            output=health_pb2.HealthCheckResponse, idempotency_level=IdempotencyLevel.NO_SIDE_EFFECTS,
            stream_type=StreamType.SERVER_STREAM,
        )
        super().__init__(
            service=service,
            endpoints=lambda svc: {f"/{service_name}/Watch": Endpoint.server_stream(method=method, function=svc.watch)},
            **options,
        )

    @property
    def path(self) -> str:
        return f"/{self.service_name}"


@pytest.fixture(scope="module")
def stack_address(cert_server, monkeypatch_module) -> str:
    from app.main import build_verifier

    monkeypatch_module.setitem(EXTERNAL_POLICIES, f"{STREAM_SERVICE}/Watch", PUBLIC)
    settings = Settings(
        app_env="test", firebase_project_id=PROJECT_ID, firebase_certs_url=cert_server.url,
        firebase_auth_emulator_host="", enabled_services=[],
    )
    verifier, _ = build_verifier(settings)
    options = {"interceptors": service_interceptors(), "codecs": server_codecs()}
    apps = [
        user_connect.UserServiceASGIApplication(BrokenUsers(), **options),
        TickerApplication(Ticker(), **options),
        TickerApplication(Ticker(), UNLISTED_SERVICE, **options),
    ]
    app = Starlette(routes=[Mount(a.path, a) for a in apps], middleware=platform_middleware(settings, verifier))
    with serve_in_thread(app) as address:
        yield address


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("method", ["GetMe", "GetUser"])
def test_unexpected_error_is_internal_over_json(stack_address, tokens, caplog, method) -> None:
    caplog.set_level(logging.ERROR, logger="app.platform.interceptors")

    response = httpx.post(
        f"http://{stack_address}/functions.user.v1.UserService/{method}",
        content=b"{}",
        headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint('alice')}"},
    )

    body = response.json()
    request_id = response.headers["x-request-id"]
    assert response.status_code == 500
    assert body["code"] == "internal"
    assert request_id in body["message"]
    for leaked in ("AttributeError", "KeyError", "NoneType", "SELECT", "Traceback", "uid"):
        assert leaked not in response.text
    errors = [r for r in caplog.records if getattr(r, "request_id", None) == request_id or request_id in r.getMessage()]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


def test_unexpected_error_is_internal_over_grpc(stack_address, tokens) -> None:
    with grpc.insecure_channel(stack_address) as channel:
        call = channel.unary_unary(
            "/functions.user.v1.UserService/GetMe",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=user_pb2.GetMeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            call(user_pb2.GetMeRequest(), metadata=[("authorization", f"Bearer {tokens.mint('alice')}")], timeout=10)

    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "AttributeError" not in raised.value.details()
    assert "request id" in raised.value.details()


def test_access_log_carries_uid(stack_address, tokens, caplog) -> None:
    caplog.set_level(logging.INFO, logger="app.access")

    response = httpx.post(
        f"http://{stack_address}/functions.user.v1.UserService/UpdateMe",
        content=b"{}",
        headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint('carol')}"},
    )

    # The line is written once the reply is sent, so it may trail the response slightly.
    deadline = time.monotonic() + 5
    while not (lines := _access_lines(caplog, "/UpdateMe")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert response.status_code == 200
    assert lines
    assert lines[-1].uid == "carol"


def _access_lines(caplog, suffix: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "app.access" and r.rpc_method.endswith(suffix)]


def test_server_stream_messages_arrive_one_by_one(stack_address) -> None:
    arrivals = []
    started = time.monotonic()

    with httpx.stream(
        "POST",
        f"http://{stack_address}/{STREAM_SERVICE}/Watch",
        content=b"\x00\x00\x00\x00\x02{}",
        headers={"content-type": "application/connect+json"},
        timeout=10,
    ) as response:
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic() - started, chunk))

    messages = [offset for offset, chunk in arrivals if chunk.startswith(b"\x00")]
    assert response.status_code == 200
    assert len(messages) >= STREAM_MESSAGES - 1
    # Delivered as sent: the last message comes about three intervals after the first, not all at once.
    assert messages[-1] - messages[0] >= (STREAM_MESSAGES - 2) * STREAM_INTERVAL_SECONDS
    end_frame = json.loads(arrivals[-1][1][5:] or b"{}")
    assert "error" not in end_frame


@pytest.mark.parametrize("authorization", [None, "admin"])
def test_method_without_policy_is_denied(stack_address, tokens, authorization) -> None:
    headers = {"content-type": "application/connect+json"}
    if authorization:
        headers["authorization"] = f"Bearer {tokens.mint('root', roles=['admin'])}"

    response = httpx.post(
        f"http://{stack_address}/{UNLISTED_SERVICE}/Watch", content=b"\x00\x00\x00\x00\x02{}", headers=headers
    )

    end_frame = json.loads(response.content[5:])
    assert end_frame["error"]["code"] == "permission_denied"
    assert "no access policy" in end_frame["error"]["message"]
