"""Per-caller rate limits against real servers: keys, replies per protocol, Redis and its outage.

Each server here runs with its own RATE_LIMIT_DEFAULT and storage. Callers are distinguished by
Fly-Client-IP (the servers trust it) or by a uid unique to this test run, so that runs sharing
one Redis never share a budget.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from functions.auth.v1 import auth_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from tests.e2e.clients import ALL_PROTOCOLS, Protocol, RpcError, call
from tests.e2e.conftest import server_env
from tests.servers import RunningServer, free_port, run_migrations, start_server

HEALTH = "grpc.health.v1.Health"
AUTH = "functions.auth.v1.AuthService"
RUN_ID = uuid.uuid4().hex[:12]
REDIS_URL = "redis://127.0.0.1:6379/0"
GRPC_LIMITED = pytest.param(Protocol.GRPC, id="grpc")


def start_servers(cert_server, directory: Path, envs: list[dict[str, str]]) -> list[RunningServer]:
    """Start one server per environment at the same time, each with its own SQLite file and log."""

    def start(index: int) -> RunningServer:
        url = f"sqlite+aiosqlite:///{directory / f'server-{index}.db'}"
        env = server_env(cert_server, url, TRUST_FLY_PROXY="true", **envs[index])
        # Every signed-in call reads the users table, which rejects deleted accounts' tokens.
        run_migrations(env)
        return start_server(env, directory / f"server-{index}.log")

    with ThreadPoolExecutor(len(envs)) as pool:
        return list(pool.map(start, range(len(envs))))


@pytest.fixture(scope="module")
def servers(cert_server, tmp_path_factory) -> Iterator[dict[str, RunningServer]]:
    names_and_envs = {
        "five_per_minute": {"RATE_LIMIT_DEFAULT": "5/minute"},
        "two_per_minute": {"RATE_LIMIT_DEFAULT": "2/minute"},
        "storage_down": {"RATE_LIMIT_DEFAULT": "1/minute", "RATE_LIMIT_STORAGE_URL": f"redis://127.0.0.1:{free_port()}/0"},
    }
    running = start_servers(cert_server, tmp_path_factory.mktemp("rate-limits"), list(names_and_envs.values()))
    try:
        yield dict(zip(names_and_envs, running))
    finally:
        for server in running:
            server.stop()


@pytest.fixture(scope="module")
def redis_client():
    redis = pytest.importorskip("redis", reason="the redis package is not installed")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis answers at {REDIS_URL}")
    yield client
    for key in client.scan_iter(match=f"*{RUN_ID}*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def redis_servers(redis_client, cert_server, tmp_path_factory) -> Iterator[list[RunningServer]]:
    env = {"RATE_LIMIT_DEFAULT": "3/minute", "RATE_LIMIT_STORAGE_URL": REDIS_URL}
    running = start_servers(cert_server, tmp_path_factory.mktemp("rate-limits-redis"), [env, env])
    try:
        yield running
    finally:
        for server in running:
            server.stop()


def post_connect_json(server: RunningServer, path: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/{path}", content=b"{}", headers={"content-type": "application/json", **headers}, timeout=10
    )


async def check_health(protocol: Protocol, server: RunningServer, fly_client_ip: str, **headers: str):
    return await call(
        protocol, server.address, HEALTH, "Check", health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse,
        headers={"fly-client-ip": fly_client_ip, **headers},
    )


async def who_am_i(protocol: Protocol, server: RunningServer, token: str, fly_client_ip: str = "203.0.113.200"):
    return await call(
        protocol, server.address, AUTH, "WhoAmI", auth_pb2.WhoAmIRequest(), auth_pb2.WhoAmIResponse,
        token=token, headers={"fly-client-ip": fly_client_ip},
    )


async def test_sixth_call_from_one_ip_is_limited(servers) -> None:
    server = servers["five_per_minute"]

    for attempt in range(5):
        await check_health(Protocol.CONNECT_JSON, server, "203.0.113.1", **{"x-forwarded-for": f"198.51.100.{attempt}"})
    with pytest.raises(RpcError) as limited:
        await check_health(Protocol.CONNECT_JSON, server, "203.0.113.1", **{"x-forwarded-for": "198.51.100.99"})

    assert limited.value.code == "resource_exhausted"
    assert limited.value.message.startswith(f"rate limit 5 per 1 minute exceeded for {HEALTH}/Check: retry in ")
    assert "203.0.113.1" not in limited.value.message


async def test_other_ip_keeps_its_budget(servers) -> None:
    server = servers["five_per_minute"]
    for _ in range(5):
        await check_health(Protocol.CONNECT_JSON, server, "203.0.113.11")
    with pytest.raises(RpcError):
        await check_health(Protocol.CONNECT_JSON, server, "203.0.113.11")

    response = await check_health(Protocol.CONNECT_JSON, server, "203.0.113.12")

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_limit_is_per_method(servers, tokens) -> None:
    server = servers["five_per_minute"]
    for _ in range(5):
        await check_health(Protocol.CONNECT_JSON, server, "203.0.113.21")

    response = await who_am_i(Protocol.CONNECT_JSON, server, tokens.mint(f"per-method-{RUN_ID}"), "203.0.113.21")
    with pytest.raises(RpcError) as anonymous:
        await call(Protocol.CONNECT_JSON, server.address, AUTH, "WhoAmI", auth_pb2.WhoAmIRequest(),
                   auth_pb2.WhoAmIResponse, headers={"fly-client-ip": "203.0.113.21"})

    assert response.uid == f"per-method-{RUN_ID}"
    assert anonymous.value.code == "unauthenticated"


async def test_signed_in_caller_keyed_by_uid(servers, tokens) -> None:
    server = servers["five_per_minute"]
    first, second = tokens.mint(f"first-{RUN_ID}"), tokens.mint(f"second-{RUN_ID}")

    # A different IP on each call: the uid, not the address, owns the budget.
    for attempt in range(5):
        await who_am_i(Protocol.CONNECT_JSON, server, first, f"203.0.113.{30 + attempt}")
    with pytest.raises(RpcError) as limited:
        await who_am_i(Protocol.CONNECT_JSON, server, first, "203.0.113.39")
    response = await who_am_i(Protocol.CONNECT_JSON, server, second, "203.0.113.30")

    assert limited.value.code == "resource_exhausted"
    assert response.uid == f"second-{RUN_ID}"


def test_third_identical_call_is_limited(servers) -> None:
    server = servers["two_per_minute"]

    replies = [post_connect_json(server, f"{HEALTH}/Check", **{"fly-client-ip": "203.0.113.50"}) for _ in range(3)]

    assert [reply.status_code for reply in replies] == [200, 200, 429]


def test_connect_json_reply_when_limited(servers) -> None:
    server = servers["two_per_minute"]

    for _ in range(2):
        post_connect_json(server, f"{HEALTH}/Check", **{"fly-client-ip": "203.0.113.60"})
    reply = post_connect_json(server, f"{HEALTH}/Check", **{"fly-client-ip": "203.0.113.60"})
    error = reply.json()
    details = {d["type"]: base64.b64decode(d["value"] + "=" * (-len(d["value"]) % 4)) for d in error["details"]}
    retry_info = error_details_pb2.RetryInfo.FromString(details["google.rpc.RetryInfo"])
    error_info = error_details_pb2.ErrorInfo.FromString(details["google.rpc.ErrorInfo"])

    assert reply.status_code == 429
    assert reply.headers["content-type"] == "application/json"
    assert error["code"] == "resource_exhausted"
    assert reply.headers["retry-after"].isdigit()
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    assert retry_info.retry_delay.seconds == int(reply.headers["retry-after"])
    assert error_info.reason == "RATE_LIMITED"
    assert error["message"] == f"rate limit 2 per 1 minute exceeded for {HEALTH}/Check: retry in {reply.headers['retry-after']} s"


def test_grpc_web_reply_when_limited(servers) -> None:
    server = servers["two_per_minute"]
    # One empty HealthCheckRequest in a gRPC-Web data frame.
    frame = b"\x00\x00\x00\x00\x00"
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "fly-client-ip": "203.0.113.70"}

    replies = [httpx.post(f"{server.url}/{HEALTH}/Check", content=frame, headers=headers, timeout=10) for _ in range(3)]

    assert [reply.status_code for reply in replies] == [200, 200, 200]
    assert replies[2].headers["grpc-status"] == "8"
    assert "rate limit 2 per 1 minute exceeded" in replies[2].headers["grpc-message"]


@pytest.mark.parametrize("protocol", [*(pytest.param(p, id=p.value) for p in ALL_PROTOCOLS if p is not Protocol.GRPC), GRPC_LIMITED])
async def test_third_call_limited_over_protocol(servers, tokens, protocol: Protocol) -> None:
    server = servers["two_per_minute"]
    token = tokens.mint(f"{protocol.value}-{RUN_ID}")

    for _ in range(2):
        await who_am_i(protocol, server, token)
    with pytest.raises(RpcError) as limited:
        await who_am_i(protocol, server, token)

    assert limited.value.code == "resource_exhausted"
    assert f"exceeded for {AUTH}/WhoAmI: retry in " in limited.value.message


@pytest.mark.parametrize("protocol", [pytest.param(Protocol.CONNECT_JSON, id="connect-json"), GRPC_LIMITED])
async def test_two_servers_share_redis_budget(redis_servers, tokens, protocol: Protocol) -> None:
    first, second = redis_servers
    token = tokens.mint(f"shared-{protocol.value}-{RUN_ID}")

    for server in (first, second, first):
        await who_am_i(protocol, server, token)
    with pytest.raises(RpcError) as limited:
        await who_am_i(protocol, second, token)

    assert limited.value.code == "resource_exhausted"
    assert limited.value.message.startswith(f"rate limit 3 per 1 minute exceeded for {AUTH}/WhoAmI")


@pytest.mark.parametrize("protocol", [Protocol.CONNECT_JSON, Protocol.GRPC], ids=lambda p: p.value)
async def test_calls_succeed_while_storage_is_down(servers, protocol: Protocol) -> None:
    server = servers["storage_down"]

    responses = [await check_health(protocol, server, "203.0.113.80") for _ in range(3)]

    assert [r.status for r in responses] == [health_pb2.HealthCheckResponse.SERVING] * 3
    assert server.log().count("rate limit storage failed") == 1

