"""Protocol detection and error replies for code that runs before connectrpc receives a request.

Middleware that rejects a call (CORS, body limits, rate limits, unknown paths) must reply in
the caller's protocol. Connect gets a JSON error body with the HTTP status of its code. gRPC-Web
gets HTTP 200 with `grpc-status` and `grpc-message` in the headers, and native gRPC gets them in
trailers.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from base64 import b64encode
from urllib.parse import quote

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import any_pb2, descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import status_pb2

from app.platform.context import current_request_id
from app.platform.errors import error_info

# gRPC status numbers, in the order of the gRPC specification.
GRPC_STATUS = {
    Code.CANCELED: 1,
    Code.UNKNOWN: 2,
    Code.INVALID_ARGUMENT: 3,
    Code.DEADLINE_EXCEEDED: 4,
    Code.NOT_FOUND: 5,
    Code.ALREADY_EXISTS: 6,
    Code.PERMISSION_DENIED: 7,
    Code.RESOURCE_EXHAUSTED: 8,
    Code.FAILED_PRECONDITION: 9,
    Code.ABORTED: 10,
    Code.OUT_OF_RANGE: 11,
    Code.UNIMPLEMENTED: 12,
    Code.INTERNAL: 13,
    Code.UNAVAILABLE: 14,
    Code.DATA_LOSS: 15,
    Code.UNAUTHENTICATED: 16,
}

# HTTP status of each Connect code, from the Connect protocol specification.
HTTP_STATUS = {
    Code.CANCELED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


# The gRPC specification lets printable ASCII other than "%" pass unencoded in grpc-message.
_GRPC_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class Protocol(enum.Enum):
    CONNECT = "connect"
    GRPC = "grpc"
    GRPC_WEB = "grpc-web"


# An RPC path is /<package.Service>/<Method>.
_RPC_PATH = re.compile(r"^/([A-Za-z_][A-Za-z0-9_.]*)/([A-Za-z_][A-Za-z0-9_]*)$")


def split_rpc_path(path: str) -> tuple[str, str]:
    """Return the service and method an RPC path names, or two empty strings for another path."""
    match = _RPC_PATH.match(path)
    return (match.group(1), match.group(2)) if match else ("", "")


@functools.lru_cache(maxsize=1024)
def method_descriptor(service: str, method: str) -> MethodDescriptor | None:
    """Return the descriptor of an RPC from the generated code's descriptor pool, or None if there is none."""
    try:
        return descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    except KeyError:
        return None


def header(scope: dict, name: bytes) -> str:
    """Return the first value of a request header, or an empty string."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def detect_protocol(scope: dict) -> Protocol:
    """Tell the RPC protocol of a request from its content type."""
    content_type = header(scope, b"content-type").lower()
    if content_type.startswith("application/grpc-web"):
        return Protocol.GRPC_WEB
    if content_type.startswith("application/grpc"):
        return Protocol.GRPC
    return Protocol.CONNECT


def connect_error_body(error: ConnectError) -> bytes:
    """Encode an error as the Connect protocol's JSON error body."""
    body: dict = {"code": error.code.value, "message": error.message}
    if error.details:
        body["details"] = [
            {"type": d.type_name, "value": b64encode(d.message_bytes).decode().rstrip("=")} for d in error.details
        ]
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def grpc_status_headers(error: ConnectError) -> list[tuple[bytes, bytes]]:
    """Return the grpc-status, percent-encoded grpc-message and grpc-status-details-bin headers of an error."""
    status = status_pb2.Status(
        code=GRPC_STATUS[error.code],
        message=error.message,
        details=[any_pb2.Any(type_url=f"type.googleapis.com/{d.type_name}", value=d.message_bytes) for d in error.details],
    )
    return [
        (b"grpc-status", str(GRPC_STATUS[error.code]).encode()),
        (b"grpc-message", quote(error.message, safe=_GRPC_MESSAGE_SAFE).encode()),
        (b"grpc-status-details-bin", b64encode(status.SerializeToString()).rstrip(b"=")),
    ]


async def send_error(
    scope: dict,
    send,
    code: Code,
    message: str,
    *,
    reason: str | None = None,
    extra_headers: list[tuple[bytes, bytes]] = (),
    details: list = (),
) -> None:
    """Reply to the request with an error encoded for its protocol."""
    error = ConnectError(code, message, [error_info(reason or code.name, current_request_id()), *details])
    protocol = detect_protocol(scope)
    headers = list(extra_headers)

    if protocol is Protocol.CONNECT:
        body = connect_error_body(error)
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": HTTP_STATUS[code], "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return

    if protocol is Protocol.GRPC and "http.response.trailers" in scope.get("extensions", {}):
        # ASGI servers never end the HEADERS frame of a response with END_STREAM, so a status
        # in the headers reaches an HTTP/2 gRPC client as a stream without trailers (UNKNOWN).
        headers.append((b"content-type", b"application/grpc"))
        await send({"type": "http.response.start", "status": 200, "headers": headers, "trailers": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await send({"type": "http.response.trailers", "headers": grpc_status_headers(error), "more_trailers": False})
        return

    # gRPC-Web, and gRPC on servers without ASGI trailers: a trailers-only reply, the status in the headers.
    content_type = b"application/grpc-web+proto" if protocol is Protocol.GRPC_WEB else b"application/grpc"
    headers += [(b"content-type", content_type), *grpc_status_headers(error)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
