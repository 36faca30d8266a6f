"""Traces, metrics and JSON access logs of real calls, in every protocol that changes how a code is read."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from functions.user.v1 import user_connect, user_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Mount

from app.main import build_verifier, platform_middleware
from app.platform import observability
from app.platform.codecs import server_codecs
from app.platform.db import Database, migrate
from app.platform.interceptors import service_interceptors
from app.settings import Settings
from app.users.handler import UserHandler
from tests.e2e.conftest import PROJECT_ID, server_env
from tests.servers import free_port, run_migrations, run_server, serve_in_thread

GET_ME = "functions.user.v1.UserService/GetMe"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


class CollectorStub:
    """An OTLP/HTTP trace receiver on loopback that records each export request."""

    def __init__(self) -> None:
        exports: list[tuple[str, str, int]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                exports.append((self.path, self.headers.get("content-type", ""), len(body)))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                return

        self.exports = exports
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> CollectorStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- one trace across the server span and its SQL spans, in process ---------------------------


@pytest.fixture
def traced_stack(cert_server, tmp_path) -> Iterator[tuple[str, InMemorySpanExporter]]:
    settings = Settings(
        app_env="test", firebase_project_id=PROJECT_ID, firebase_certs_url=cert_server.url,
        firebase_auth_emulator_host="", enabled_services=[],
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'functions.db'}",
    )
    asyncio.run(migrate(settings))
    database = Database.from_settings(settings)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observability.enable_tracing(provider, database)

    verifier, _ = build_verifier(settings)
    users = user_connect.UserServiceASGIApplication(
        UserHandler(database), interceptors=service_interceptors(), codecs=server_codecs()
    )
    app = Starlette(routes=[Mount(users.path, users)], middleware=platform_middleware(settings, verifier))
    try:
        with serve_in_thread(app) as address:
            yield address, exporter
    finally:
        observability.disable_tracing()
        provider.shutdown()
        asyncio.run(database.dispose())


def test_get_me_is_one_trace_with_sql_spans(traced_stack, tokens) -> None:
    address, exporter = traced_stack

    response = httpx.post(
        f"http://{address}/{GET_ME}",
        content=b"{}",
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {tokens.mint('alice')}",
            "traceparent": TRACEPARENT,
        },
    )

    spans = _wait_for_spans(exporter, lambda s: any(span.kind is SpanKind.SERVER for span in s))
    server_spans = [span for span in spans if span.kind is SpanKind.SERVER]
    sql_spans = [span for span in spans if span.attributes.get("db.system") or span.attributes.get("db.system.name")]
    assert response.status_code == 200
    assert len(server_spans) == 1
    server = server_spans[0]
    assert server.name == GET_ME
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_SPAN_ID
    assert server.attributes["rpc.system"] == "connect_rpc"
    assert server.attributes["rpc.service"] == "functions.user.v1.UserService"
    assert server.attributes["rpc.method"] == "GetMe"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["app.request_id"] == response.headers["x-request-id"]
    assert sql_spans
    for span in sql_spans:
        assert span.context.trace_id == server.context.trace_id
        assert span.parent.span_id == server.context.span_id


def test_grpc_call_span_has_grpc_status(traced_stack) -> None:
    address, exporter = traced_stack

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/{GET_ME}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=user_pb2.GetMeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            call(user_pb2.GetMeRequest(), metadata=[("traceparent", TRACEPARENT)], timeout=10)

    spans = _wait_for_spans(exporter, lambda s: any(span.kind is SpanKind.SERVER for span in s))
    server = next(span for span in spans if span.kind is SpanKind.SERVER)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.grpc.status_code"] == 16
    assert format(server.context.trace_id, "032x") == TRACE_ID


def _wait_for_spans(exporter: InMemorySpanExporter, is_complete, timeout: float = 5.0):
    # The server span ends after the reply is sent, so it may trail the response slightly.
    deadline = time.monotonic() + timeout
    while not is_complete(spans := exporter.get_finished_spans()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return spans


# --- a real server with metrics on the main port, JSON logs and OTLP export -------------------


@pytest.fixture(scope="module")
def collector() -> Iterator[CollectorStub]:
    with CollectorStub() as stub:
        yield stub


@pytest.fixture(scope="module")
def observed_server(tmp_path_factory, cert_server, collector):
    directory = tmp_path_factory.mktemp("observed")
    env = server_env(
        cert_server, f"sqlite+aiosqlite:///{directory / 'functions.db'}",
        DEV_KEYS_DIR=str(directory / "dev-keys"),
        LOG_FORMAT="json",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_SERVICE_NAME="functions-e2e",
        # Export within a fraction of a second instead of the SDK's default 5 s batch delay.
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    run_migrations(env)
    with run_server(env, directory / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def calls(observed_server, tokens) -> dict[str, httpx.Response]:
    """Make one call of each kind the metrics tell apart, and return the replies by name."""
    url = f"{observed_server.url}/{GET_ME}"
    json_headers = {"content-type": "application/json"}
    signed_in = {**json_headers, "authorization": f"Bearer {tokens.mint('alice')}", "traceparent": TRACEPARENT}
    replies = {f"ok{i}": httpx.post(url, content=b"{}", headers=signed_in) for i in range(3)}
    replies["missing_token"] = httpx.post(url, content=b"{}", headers=json_headers)
    replies["malformed"] = httpx.post(url, content=b"{}", headers={**json_headers, "authorization": "Basic abc"})
    replies["unknown"] = httpx.post(f"{observed_server.url}/no.Such/Method{time.time_ns()}", content=b"{}", headers=json_headers)
    with grpc.insecure_channel(observed_server.address) as channel:
        call = channel.unary_unary(
            f"/{GET_ME}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=user_pb2.GetMeResponse.FromString,
        )
        call(user_pb2.GetMeRequest(), metadata=[("authorization", f"Bearer {tokens.mint('bob')}")], timeout=10)
    return replies


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(url)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_calls_by_method_and_code(observed_server, calls) -> None:
    samples = _scrape(f"{observed_server.url}/metrics")

    ok = ("rpc_server_requests_total", (("code", "ok"), ("method", GET_ME)))
    unauthenticated = ("rpc_server_requests_total", (("code", "unauthenticated"), ("method", GET_ME)))
    unknown = ("rpc_server_requests_total", (("code", "unimplemented"), ("method", "other")))
    assert samples[ok] == 4  # three Connect calls and one gRPC call
    assert samples[unauthenticated] == 2
    assert samples[unknown] == 1


def test_metrics_record_latency_and_in_flight(observed_server, calls) -> None:
    samples = _scrape(f"{observed_server.url}/metrics")

    assert samples[("rpc_server_duration_seconds_count", (("method", GET_ME),))] == 6
    assert samples[("rpc_server_duration_seconds_sum", (("method", GET_ME),))] > 0
    assert samples[("rpc_server_in_flight_requests", ())] == 0


def test_metrics_count_auth_failures_by_reason(observed_server, calls) -> None:
    samples = _scrape(f"{observed_server.url}/metrics")

    assert samples[("auth_failures_total", (("reason", "MISSING_TOKEN"),))] == 1
    assert samples[("auth_failures_total", (("reason", "MALFORMED_AUTHORIZATION"),))] == 1


def test_metrics_report_database_pool(observed_server, calls) -> None:
    samples = _scrape(f"{observed_server.url}/metrics")

    assert samples[("db_pool_size_connections", ())] == 10
    assert samples[("db_pool_checked_out_connections", ())] == 0


def test_metrics_scrape_is_not_counted_as_rpc(observed_server, calls) -> None:
    _scrape(f"{observed_server.url}/metrics")
    samples = _scrape(f"{observed_server.url}/metrics")

    methods = {dict(labels).get("method") for name, labels in samples if name == "rpc_server_requests_total"}
    assert methods == {GET_ME, "other"}


def test_access_log_is_one_json_line_per_rpc(observed_server, calls) -> None:
    request_id = calls["ok0"].headers["x-request-id"]

    lines = _access_lines(observed_server, request_id)

    assert len(lines) == 1
    line = lines[0]
    assert line["rpc_method"] == f"/{GET_ME}"
    assert line["protocol"] == "connect"
    assert line["http_status"] == 200
    assert line["code"] == "ok"
    assert isinstance(line["duration_ms"], float | int)
    assert line["uid"] == "alice"
    assert line["trace_id"] == TRACE_ID


def test_access_log_of_grpc_call_has_code(observed_server, calls) -> None:
    lines = [line for line in _json_lines(observed_server) if line.get("logger") == "app.access" and line.get("protocol") == "grpc"]

    assert len(lines) == 1
    assert lines[0]["code"] == "ok"
    assert lines[0]["uid"] == "bob"
    assert len(lines[0]["trace_id"]) == 32


def test_logs_carry_no_tokens_or_bodies(observed_server, calls, tokens) -> None:
    text = _wait_for_log(observed_server, calls["unknown"].headers["x-request-id"])

    assert "Bearer" not in text
    assert "eyJ" not in text  # the start of every JWT
    assert "Basic abc" not in text
    assert "alice@example.com" not in text


def test_traces_are_exported_over_otlp_http(observed_server, calls, collector) -> None:
    deadline = time.monotonic() + 10
    while not collector.exports and time.monotonic() < deadline:
        time.sleep(0.05)

    assert collector.exports
    path, content_type, size = collector.exports[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert size > 0


def _json_lines(server) -> list[dict]:
    lines = []
    for raw in server.log().splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


def _wait_for_log(server, request_id: str) -> str:
    # The access line is written once the reply is sent, so it may trail the response slightly.
    deadline = time.monotonic() + 5
    while request_id not in (text := server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return text


def _access_lines(server, request_id: str) -> list[dict]:
    _wait_for_log(server, request_id)
    return [line for line in _json_lines(server) if line.get("logger") == "app.access" and line.get("request_id") == request_id]


# --- metrics on a port of their own --------------------------------------------------------


def test_metrics_port_serves_metrics_apart(tmp_path, cert_server, tokens) -> None:
    metrics_port = free_port()
    env = server_env(
        cert_server, f"sqlite+aiosqlite:///{tmp_path / 'functions.db'}",
        DEV_KEYS_DIR=str(tmp_path / "dev-keys"), METRICS_PORT=str(metrics_port),
    )
    run_migrations(env)

    with run_server(env, tmp_path / "server.log") as running:
        httpx.post(
            f"{running.url}/{GET_ME}", content=b"{}",
            headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint('alice')}"},
        )
        samples = _scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        on_main_port = httpx.get(f"{running.url}/metrics")

    assert samples[("rpc_server_requests_total", (("code", "ok"), ("method", GET_ME)))] == 1
    assert on_main_port.status_code != 200
