"""Graceful shutdown of a real server process on SIGTERM and SIGINT.

A unary call is held in flight by sending its request body in two parts over a raw socket: the
server has the headers and waits for the rest, which the test sends only after the signal. Server
streams are Health/Watch over Connect, gRPC-Web and native gRPC.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import h11
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import server_env
from tests.servers import RunningServer, start_server

CHECK_PATH = "/grpc.health.v1.Health/Check"
WATCH_PATH = "/grpc.health.v1.Health/Watch"
GRACE_SECONDS = 5
# Time for the server to see the signal: uvicorn checks for it every 0.1 s.
SIGNAL_SETTLE_SECONDS = 0.5
END_STREAM_FLAG = 0x02


@pytest.fixture
def server(tmp_path: Path, cert_server) -> Iterator[RunningServer]:
    env = server_env(
        cert_server,
        f"sqlite+aiosqlite:///{tmp_path / 'functions.db'}",
        DEV_KEYS_DIR=str(tmp_path / "dev-keys"),
        SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
    )
    running = start_server(env, tmp_path / "server.log")
    try:
        yield running
    finally:
        # Only reached with the process still running when a test failed before stopping it.
        running.stop(signal.SIGKILL)


class HeldCall:
    """A Connect JSON call to Health/Check whose request body is sent in two parts."""

    def __init__(self, server: RunningServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        head = (
            f"POST {CHECK_PATH} HTTP/1.1\r\n"
            f"host: {server.address}\r\n"
            "content-type: application/json\r\n"
            "content-length: 2\r\n"
            "\r\n"
            "{"
        )
        self.sock.sendall(head.encode())

    def finish(self) -> tuple[int, dict]:
        """Send the rest of the body and return the reply's status and JSON body."""
        self.sock.sendall(b"}")
        reply = b""
        while chunk := self.sock.recv(65536):
            reply += chunk
        self.sock.close()
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="POST", target=CHECK_PATH, headers=[("host", "x"), ("content-length", "2")]))
        parser.send(h11.Data(data=b"{}"))
        parser.send(h11.EndOfMessage())
        parser.receive_data(reply)
        status, body = 0, b""
        event = parser.next_event()
        while event not in (h11.NEED_DATA, h11.PAUSED) and not isinstance(event, h11.EndOfMessage):
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            event = parser.next_event()
        return status, json.loads(body)


class ConnectWatch:
    """A Health/Watch stream over Connect, read on a thread until it ends."""

    def __init__(self, server: RunningServer, content_type: str = "application/connect+json") -> None:
        self.client = httpx.Client(timeout=30)
        request = self.client.build_request(
            "POST",
            f"{server.url}{WATCH_PATH}",
            content=b"\x00\x00\x00\x00\x02{}" if content_type.endswith("json") else b"\x00\x00\x00\x00\x00",
            headers={"content-type": content_type},
        )
        self.response = self.client.send(request, stream=True)
        self.body = b""
        self.first_message = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.first_message.wait(10), "the Watch stream sent no first message"

    def _read(self) -> None:
        for chunk in self.response.iter_raw():
            self.body += chunk
            self.first_message.set()
        self.response.close()
        self.client.close()

    def messages(self, timeout: float) -> list[tuple[int, bytes]]:
        """Wait for the stream to end; return its (flags, payload) envelopes."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the Watch stream did not end"
        envelopes = []
        data = self.body
        while data:
            length = int.from_bytes(data[1:5], "big")
            envelopes.append((data[0], data[5 : 5 + length]))
            data = data[5 + length :]
        return envelopes


class GrpcWatch:
    """A Health/Watch stream over native gRPC, read on a thread until it ends."""

    def __init__(self, server: RunningServer) -> None:
        self.channel = grpc.insecure_channel(server.address)
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest())
        self.statuses: list[int] = []
        self.error: grpc.RpcError | None = None
        self.first_message = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.first_message.wait(10), "the gRPC Watch stream sent no first message"

    def _read(self) -> None:
        try:
            for response in self.call:
                self.statuses.append(response.status)
                self.first_message.set()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.channel.close()

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the gRPC Watch stream did not end"


def is_refused(server: RunningServer) -> bool:
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_for_exit(server: RunningServer, timeout: float) -> tuple[int | None, float]:
    """Return the exit code (None if still running after `timeout`) and the seconds waited."""
    started = time.monotonic()
    try:
        code = server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - started


def test_unary_call_in_flight_completes(server) -> None:
    call = HeldCall(server)
    time.sleep(SIGNAL_SETTLE_SECONDS)

    server.process.send_signal(signal.SIGTERM)
    time.sleep(SIGNAL_SETTLE_SECONDS)
    status, body = call.finish()
    code, waited = wait_for_exit(server, GRACE_SECONDS + 5)

    assert status == 200
    # Health reports NOT_SERVING once shutdown started, but the call itself succeeds.
    assert body == {"status": "NOT_SERVING"}
    assert code == 0
    assert waited < GRACE_SECONDS


def test_new_connections_are_refused(server) -> None:
    call = HeldCall(server)
    time.sleep(SIGNAL_SETTLE_SECONDS)

    server.process.send_signal(signal.SIGTERM)
    time.sleep(SIGNAL_SETTLE_SECONDS)
    refused = is_refused(server)
    call.finish()
    code, _ = wait_for_exit(server, GRACE_SECONDS + 5)

    assert refused
    assert code == 0


def test_connect_stream_ends_unavailable(server) -> None:
    watch = ConnectWatch(server)

    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    envelopes = watch.messages(GRACE_SECONDS)
    ended_after = time.monotonic() - started
    code, _ = wait_for_exit(server, GRACE_SECONDS + 5)

    flags, end_stream = envelopes[-1]
    statuses = [json.loads(payload)["status"] for flags, payload in envelopes[:-1]]
    error = json.loads(end_stream)["error"]
    assert flags & END_STREAM_FLAG
    assert statuses[-1] == "NOT_SERVING"
    assert error["code"] == "unavailable"
    assert error["message"] == "server is shutting down: reconnect to another instance"
    # Well within the grace period: the stream is ended, not left to time out.
    assert ended_after < 2
    assert code == 0


def test_grpc_web_stream_ends_unavailable(server) -> None:
    watch = ConnectWatch(server, content_type="application/grpc-web+proto")

    server.process.send_signal(signal.SIGTERM)
    envelopes = watch.messages(GRACE_SECONDS)
    code, _ = wait_for_exit(server, GRACE_SECONDS + 5)

    flags, trailers = envelopes[-1]
    assert flags & 0x80
    assert b"grpc-status: 14" in trailers
    assert code == 0


def test_grpc_stream_ends_unavailable(server) -> None:
    watch = GrpcWatch(server)

    server.process.send_signal(signal.SIGTERM)
    watch.wait(GRACE_SECONDS)
    code, _ = wait_for_exit(server, GRACE_SECONDS + 5)

    assert watch.error is not None
    assert watch.error.code() == grpc.StatusCode.UNAVAILABLE
    assert watch.statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == 0


def test_stream_and_unary_call_together(server) -> None:
    call = HeldCall(server)
    watch = ConnectWatch(server)
    time.sleep(SIGNAL_SETTLE_SECONDS)

    server.process.send_signal(signal.SIGTERM)
    envelopes = watch.messages(GRACE_SECONDS)
    status, _ = call.finish()
    code, _ = wait_for_exit(server, GRACE_SECONDS + 5)

    assert json.loads(envelopes[-1][1])["error"]["code"] == "unavailable"
    assert status == 200
    assert code == 0


def test_sigint_exits_zero(server) -> None:
    server.process.send_signal(signal.SIGINT)
    code, waited = wait_for_exit(server, GRACE_SECONDS + 5)

    assert code == 0
    assert waited < GRACE_SECONDS


def test_call_past_grace_period_is_cut(server) -> None:
    call = HeldCall(server)
    time.sleep(SIGNAL_SETTLE_SECONDS)

    server.process.send_signal(signal.SIGTERM)
    code, waited = wait_for_exit(server, GRACE_SECONDS + 3)
    call.sock.settimeout(1)
    try:
        reply = call.sock.recv(65536)
    finally:
        call.sock.close()

    assert code == 0
    assert GRACE_SECONDS - 0.5 < waited < GRACE_SECONDS + 5
    assert b'"code": "canceled"' in reply


def test_database_pool_is_disposed(server) -> None:
    server.process.send_signal(signal.SIGTERM)
    code, _ = wait_for_exit(server, GRACE_SECONDS + 5)

    assert code == 0
    assert "stopped" in server.log()
