"""The overload guard on a real server: past its limits, calls fail fast with `unavailable`.

Unary calls whose body never finishes arriving hold MAX_CONCURRENT_REQUESTS slots, and open
Health/Watch streams hold MAX_CONCURRENT_STREAMS slots; each stays in flight until its client
goes away.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import server_env
from tests.servers import RunningServer, run_migrations, run_server

MAX_CONCURRENT_REQUESTS = 2
MAX_CONCURRENT_STREAMS = 2
CHECK_PATH = "/grpc.health.v1.Health/Check"
WATCH_PATH = "/grpc.health.v1.Health/Watch"
# A rejection must not wait for a slot; this bounds it with plenty of room for a slow CI machine.
FAST_REPLY_SECONDS = 1.0


@pytest.fixture(scope="module")
def overload_server(tmp_path_factory, cert_server) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("overload")
    env = server_env(
        cert_server,
        f"sqlite+aiosqlite:///{directory / 'functions.db'}",
        DEV_KEYS_DIR=str(directory / "dev-keys"),
        MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT_REQUESTS),
        MAX_CONCURRENT_STREAMS=str(MAX_CONCURRENT_STREAMS),
    )
    # Health checks report SERVING only once the database schema is current.
    run_migrations(env)
    with run_server(env, directory / "server.log") as running:
        yield running


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + len(payload).to_bytes(4, "big") + payload


@contextlib.contextmanager
def open_watches(server: RunningServer, count: int) -> Iterator[None]:
    """Hold `count` Health/Watch streams open, each on its own connection, until the block ends."""
    # Dropping a response's byte iterator closes the stream, so they stay referenced here.
    readers = []
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            client = stack.enter_context(httpx.Client(timeout=10.0))
            response = stack.enter_context(
                client.stream(
                    "POST",
                    f"{server.url}{WATCH_PATH}",
                    content=envelope(b"{}"),
                    headers={"content-type": "application/connect+json"},
                )
            )
            assert response.status_code == 200
            reader = response.iter_raw()
            # The first message arrives once the call is in flight on the server.
            next(reader)
            readers.append(reader)
        yield


def in_flight(server: RunningServer) -> float:
    """Return the server's rpc_server_in_flight_requests gauge."""
    for line in httpx.get(f"{server.url}/metrics", timeout=10.0).text.splitlines():
        if line.startswith("rpc_server_in_flight_requests "):
            return float(line.split()[1])
    raise AssertionError("the server reports no rpc_server_in_flight_requests gauge")


@contextlib.contextmanager
def hold_calls(server: RunningServer, count: int) -> Iterator[None]:
    """Hold `count` unary Check calls in flight: each sends its headers and one of 10 body bytes."""
    request = (
        f"POST {CHECK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        "content-length: 10\r\n\r\n{"
    ).encode()
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            connection = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=10.0))
            connection.sendall(request)
        deadline = time.monotonic() + 5.0
        while in_flight(server) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        yield


def error_reason(body: dict) -> str:
    for detail in body.get("details", []):
        if detail["type"] == "google.rpc.ErrorInfo":
            value = detail["value"] + "=" * (-len(detail["value"]) % 4)
            return error_details_pb2.ErrorInfo.FromString(base64.b64decode(value)).reason
    return ""


def check_over_json(server: RunningServer) -> httpx.Response:
    return httpx.post(
        f"{server.url}{CHECK_PATH}", content=b"{}", headers={"content-type": "application/json"}, timeout=10.0
    )


def wait_until_check_succeeds(server: RunningServer, timeout: float = 5.0) -> httpx.Response:
    """Retry Check while the server notices the closed streams; return the last reply."""
    deadline = time.monotonic() + timeout
    response = check_over_json(server)
    while response.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
        response = check_over_json(server)
    return response


def test_call_past_limit_is_unavailable_over_json(overload_server) -> None:
    with hold_calls(overload_server, MAX_CONCURRENT_REQUESTS):
        started = time.monotonic()
        response = check_over_json(overload_server)
        elapsed = time.monotonic() - started

    body = response.json()
    assert response.status_code == 503
    assert body["code"] == "unavailable"
    assert body["message"] == "server is overloaded: retry with backoff"
    assert error_reason(body) == "OVERLOADED"
    assert elapsed < FAST_REPLY_SECONDS


def test_call_past_limit_is_unavailable_over_grpc_web(overload_server) -> None:
    with hold_calls(overload_server, MAX_CONCURRENT_REQUESTS):
        response = httpx.post(
            f"{overload_server.url}{CHECK_PATH}",
            content=envelope(health_pb2.HealthCheckRequest().SerializeToString()),
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
            timeout=10.0,
        )

    assert response.status_code == 200
    assert response.headers["grpc-status"] == "14"
    assert "overloaded" in response.headers["grpc-message"]


def test_call_past_limit_is_unavailable_over_grpc(overload_server) -> None:
    with (
        hold_calls(overload_server, MAX_CONCURRENT_REQUESTS),
        grpc.insecure_channel(overload_server.address) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10.0)
        elapsed = time.monotonic() - started

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "server is overloaded: retry with backoff"
    assert elapsed < FAST_REPLY_SECONDS


def test_healthz_answers_while_saturated(overload_server) -> None:
    with hold_calls(overload_server, MAX_CONCURRENT_REQUESTS):
        healthz = httpx.get(f"{overload_server.url}/healthz", timeout=10.0)
        readyz = httpx.get(f"{overload_server.url}/readyz", timeout=10.0)

    assert healthz.status_code == 200
    assert readyz.status_code == 200


def test_preflight_answers_while_saturated(overload_server) -> None:
    with hold_calls(overload_server, MAX_CONCURRENT_REQUESTS):
        response = httpx.options(
            f"{overload_server.url}{CHECK_PATH}",
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
            timeout=10.0,
        )

    assert response.status_code == 204


def test_calls_succeed_after_load_drops(overload_server) -> None:
    with hold_calls(overload_server, MAX_CONCURRENT_REQUESTS):
        rejected = check_over_json(overload_server)

    response = wait_until_check_succeeds(overload_server)

    assert rejected.status_code == 503
    assert response.status_code == 200
    assert json.loads(response.content) == {"status": "SERVING"}


def test_calls_below_limit_succeed(overload_server) -> None:
    with hold_calls(overload_server, MAX_CONCURRENT_REQUESTS - 1):
        response = check_over_json(overload_server)

    assert response.status_code == 200


def test_stream_past_limit_is_unavailable(overload_server) -> None:
    with open_watches(overload_server, MAX_CONCURRENT_STREAMS):
        response = httpx.post(
            f"{overload_server.url}{WATCH_PATH}",
            content=envelope(b"{}"),
            headers={"content-type": "application/connect+json"},
            timeout=10.0,
        )

    assert response.status_code == 503
    assert response.json()["message"] == "server has its maximum of open streams: retry with backoff"


def test_open_streams_leave_calls_alone(overload_server) -> None:
    with open_watches(overload_server, MAX_CONCURRENT_STREAMS):
        response = check_over_json(overload_server)

    assert response.status_code == 200


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, cert_server) -> Iterator[RunningServer]:
    """A server with a short request body timeout and a small per-caller limit."""
    directory = tmp_path_factory.mktemp("strict")
    env = server_env(
        cert_server,
        f"sqlite+aiosqlite:///{directory / 'functions.db'}",
        DEV_KEYS_DIR=str(directory / "dev-keys"),
        REQUEST_BODY_TIMEOUT_SECONDS="1",
        MAX_CALLS_PER_CALLER="2",
    )
    run_migrations(env)
    with run_server(env, directory / "server.log") as running:
        yield running


def read_reply(connection: socket.socket) -> bytes:
    connection.settimeout(10.0)
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = connection.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply


def test_stalled_request_body_ends_with_deadline_exceeded(strict_server) -> None:
    request = (
        f"POST {CHECK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        "content-length: 10\r\n\r\n{"
    ).encode()
    with socket.create_connection(("127.0.0.1", strict_server.port), timeout=10.0) as connection:
        connection.sendall(request)
        started = time.monotonic()
        reply = read_reply(connection)
        elapsed = time.monotonic() - started

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504")
    assert json.loads(body)["code"] == "deadline_exceeded"
    assert json.loads(body)["message"] == "the request body did not arrive within 1 s"
    assert elapsed < 5.0


def test_calls_per_caller_limited(strict_server) -> None:
    with hold_calls(strict_server, 2):
        response = check_over_json(strict_server)

    body = response.json()
    assert response.status_code == 429
    assert body["code"] == "resource_exhausted"
    assert error_reason(body) == "TOO_MANY_CALLS_IN_PROGRESS"
    assert body["message"].startswith("too many calls in progress for this caller: 2 of at most 2")


def test_open_stream_outlives_the_body_timeout(strict_server) -> None:
    """Once a stream's request body is complete, the body timeout no longer applies to it."""
    with httpx.Client(timeout=httpx.Timeout(10.0, read=2.5)) as client, client.stream(
        "POST", f"{strict_server.url}{WATCH_PATH}", content=envelope(b"{}"), headers={"content-type": "application/connect+json"}
    ) as response:
        reader = response.iter_raw()
        first = next(reader)
        with pytest.raises(httpx.ReadTimeout):
            next(reader)

    assert response.status_code == 200
    assert b"SERVING" in first


def test_reflection_stream_is_not_timed(strict_server) -> None:
    """buf curl keeps its reflection stream open, silent, for as long as the call it makes lasts."""
    # ServerReflectionRequest with list_services = "" (field 7), encoded by hand.
    list_services = b"\x3a\x00"
    requests: queue.Queue[bytes | None] = queue.Queue()
    with grpc.insecure_channel(strict_server.address) as channel:
        call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")(
            iter(requests.get, None), timeout=10.0
        )
        requests.put(list_services)
        first = next(call)
        # Longer than the server's 1 s request body timeout.
        time.sleep(2.0)
        requests.put(list_services)
        second = next(call)
        requests.put(None)

    assert b"functions.user.v1.UserService" in first
    assert b"functions.user.v1.UserService" in second
