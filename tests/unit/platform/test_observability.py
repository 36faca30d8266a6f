"""How the observability layer reads a reply's code, labels methods and tags log records."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from app.platform import observability
from app.platform.observability import ReplyRecorder, TraceContextFilter, method_label
from app.platform.wire import Protocol


def _replay(protocol: Protocol, messages: list[dict]) -> str:
    recorder = ReplyRecorder(protocol)
    sent = []

    async def send(message) -> None:
        sent.append(message)

    async def replay() -> None:
        wrapped = recorder.wrap(send)
        for message in messages:
            await wrapped(message)

    asyncio.run(replay())
    assert sent == messages
    return recorder.code()


def _start(status: int, content_type: bytes, *headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type), *headers]}


def _body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _frame(flags: int, payload: bytes) -> bytes:
    return bytes([flags]) + len(payload).to_bytes(4, "big") + payload


def test_connect_unary_ok() -> None:
    assert _replay(Protocol.CONNECT, [_start(200, b"application/json"), _body(b"{}")]) == "ok"


def test_connect_unary_error_code_from_body() -> None:
    body = json.dumps({"code": "failed_precondition", "message": "m"}).encode()

    assert _replay(Protocol.CONNECT, [_start(400, b"application/json"), _body(body)]) == "failed_precondition"


def test_connect_unary_error_without_body_uses_http_status() -> None:
    assert _replay(Protocol.CONNECT, [_start(503, b"text/plain"), _body(b"busy")]) == "unavailable"


@pytest.mark.parametrize(
    ("end_stream", "expected"),
    [
        (b"{}", "ok"),
        (json.dumps({"error": {"code": "resource_exhausted"}}).encode(), "resource_exhausted"),
    ],
)
def test_connect_stream_code_from_end_stream_frame(end_stream, expected) -> None:
    messages = [
        _start(200, b"application/connect+json"),
        _body(_frame(0, b'{"status":"SERVING"}'), more=True),
        _body(_frame(2, end_stream)),
    ]

    assert _replay(Protocol.CONNECT, messages) == expected


@pytest.mark.parametrize(
    ("end_stream", "expected"),
    [
        (b"{}", "ok"),
        (json.dumps({"error": {"code": "invalid_argument"}}).encode(), "invalid_argument"),
    ],
)
def test_connect_stream_code_from_compressed_end_stream_frame(end_stream, expected) -> None:
    start = _start(200, b"application/connect+proto", (b"connect-content-encoding", b"gzip"))
    messages = [start, _body(_frame(1, gzip.compress(b"\x0a\x02ok")), more=True), _body(_frame(3, gzip.compress(end_stream)))]

    assert _replay(Protocol.CONNECT, messages) == expected


def test_grpc_code_from_trailers() -> None:
    messages = [
        _start(200, b"application/grpc"),
        _body(_frame(0, b"\x0a\x00"), more=True),
        {"type": "http.response.trailers", "headers": [(b"grpc-status", b"5")], "more_trailers": False},
    ]

    assert _replay(Protocol.GRPC, messages) == "not_found"


def test_grpc_trailers_only_reply() -> None:
    messages = [_start(200, b"application/grpc", (b"grpc-status", b"16")), _body(b"")]

    assert _replay(Protocol.GRPC, messages) == "unauthenticated"


def test_grpc_web_code_from_trailer_frame() -> None:
    trailer = _frame(0x80, b"grpc-status: 0\r\ngrpc-message: \r\n")
    messages = [_start(200, b"application/grpc-web+proto"), _body(_frame(0, b""), more=True), _body(trailer)]

    assert _replay(Protocol.GRPC_WEB, messages) == "ok"


def test_grpc_web_text_code_from_base64_trailer_frame() -> None:
    trailer = base64.b64encode(_frame(0x80, b"grpc-status: 7\r\n"))
    messages = [_start(200, b"application/grpc-web-text+proto"), _body(base64.b64encode(b"\x00\x00\x00\x00\x00"), more=True), _body(trailer)]

    assert _replay(Protocol.GRPC_WEB, messages) == "permission_denied"


def test_reply_never_started_is_unknown() -> None:
    assert _replay(Protocol.CONNECT, []) == "unknown"


@pytest.mark.parametrize(
    ("path", "code", "expected"),
    [
        ("/functions.user.v1.UserService/GetMe", "ok", "functions.user.v1.UserService/GetMe"),
        ("/functions.user.v1.UserService/Nope", "unimplemented", "other"),
        ("/favicon.ico", "unimplemented", "other"),
        ("/a/b/c", "resource_exhausted", "other"),
    ],
)
def test_method_label(path, code, expected) -> None:
    assert method_label(path, code) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/storage/v1/local/user-1/0123abcd", "/storage/v1/local/{key}"),
        ("/storage/v1/local/user-1/0123abcd/thumbnail", "/storage/v1/local/{key}"),
        ("/favicon.ico", "/favicon.ico"),
    ],
)
def test_span_route_hides_object_keys(path, expected) -> None:
    assert observability._route_of(path) == expected


def test_method_labels_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(observability, "_method_labels", set())
    monkeypatch.setattr(observability, "MAX_METHOD_LABELS", 2)

    labels = [method_label(f"/pkg.Service/Method{i}", "ok") for i in range(3)]

    assert labels == ["pkg.Service/Method0", "pkg.Service/Method1", "other"]
    assert method_label("/pkg.Service/Method0", "ok") == "pkg.Service/Method0"


def test_log_record_gets_current_span_ids() -> None:
    tracer = TracerProvider().get_tracer(__name__)
    record = logging.makeLogRecord({"msg": "inside"})

    with tracer.start_as_current_span("call") as span:
        TraceContextFilter().filter(record)

    assert record.trace_id == format(span.get_span_context().trace_id, "032x")
    assert record.span_id == format(span.get_span_context().span_id, "016x")


def test_log_record_after_span_gets_request_trace_id() -> None:
    record = logging.makeLogRecord({"msg": "access"})
    token = observability.trace_id_var.set("4bf92f3577b34da6a3ce929d0e0e4736")

    try:
        TraceContextFilter().filter(record)
    finally:
        observability.trace_id_var.reset(token)

    assert record.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_log_record_without_tracing_has_no_trace_id() -> None:
    record = logging.makeLogRecord({"msg": "untraced"})

    TraceContextFilter().filter(record)

    assert record.trace_id is None
