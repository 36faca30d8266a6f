"""Pure ASGI middleware shared by every service: request context, CORS, gRPC-Web text, auth.

These are plain ASGI callables, not Starlette's BaseHTTPMiddleware, which runs the app in
another task (so contextvars set inside never reach the outer layers) and buffers streams.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
import uuid

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from app.platform.context import (
    Principal,
    auth_error_var,
    principal_var,
    request_id_var,
    trace_id_var,
)
from app.platform.errors import ServiceError, Unauthenticated, error_info
from app.platform.wire import (
    Protocol,
    connect_error_body,
    detect_protocol,
    header,
    method_descriptor,
    send_error,
    split_rpc_path,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Scope key of the RPC reply's code ("ok", "not_found"), set by ObservabilityMiddleware.
RPC_CODE_SCOPE_KEY = "functions.rpc_code"


class RequestContextMiddleware:
    """Assign the request id, return it in `x-request-id`, and log one line per request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        incoming = header(scope, b"x-request-id")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request_id_token = request_id_var.set(request_id)
        # A fresh principal per request: the auth middleware sets it further in,
        # and this layer reads it back for the log line.
        principal_token = principal_var.set(None)
        auth_error_token = auth_error_var.set(None)
        trace_id_token = trace_id_var.set(None)
        outcome = {"status": 0}
        started = time.perf_counter()

        async def send_with_request_id(message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.encode()))
                if not any(key == b"cache-control" for key, _ in headers):
                    # Replies carry one caller's data, so shared caches must not keep them.
                    headers.append((b"cache-control", b"private, no-store"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            bad_header = _first_non_utf8_header(scope)
            if bad_header is not None:
                await send_error(
                    scope, send_with_request_id, Code.INVALID_ARGUMENT,
                    f"request header {bad_header} must be valid UTF-8", reason="INVALID_HEADER",
                )
            else:
                await self.app(scope, receive, send_with_request_id)
        finally:
            self._log(scope, outcome, time.perf_counter() - started)
            trace_id_var.reset(trace_id_token)
            auth_error_var.reset(auth_error_token)
            principal_var.reset(principal_token)
            request_id_var.reset(request_id_token)

    @staticmethod
    def _log(scope, outcome: dict, seconds: float) -> None:
        path = scope["path"]
        level = logging.DEBUG if path in _QUIET_PATHS or scope["method"] == "OPTIONS" else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        principal = principal_var.get()
        # ObservabilityMiddleware reads the RPC's code from the reply, whatever the protocol.
        code = scope.get(RPC_CODE_SCOPE_KEY, "")
        access_log.log(
            level,
            "%s %s %s",
            scope["method"],
            path,
            code or outcome["status"],
            extra={
                "rpc_method": path,
                "protocol": detect_protocol(scope).value,
                "http_status": outcome["status"],
                "code": code,
                "duration_ms": round(seconds * 1000, 2),
                "uid": principal.uid if principal else None,
            },
        )


def _first_non_utf8_header(scope) -> str | None:
    """Return the name of the first header whose value is not UTF-8, which connectrpc cannot decode."""
    for key, value in scope.get("headers", ()):
        try:
            value.decode()
        except UnicodeDecodeError:
            return key.decode("latin-1")
    return None


# Request headers that Connect-Web and gRPC-Web clients send, for preflight replies.
CORS_ALLOWED_HEADERS = (
    "authorization",
    "content-type",
    "accept-encoding",
    "content-encoding",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-accept-encoding",
    "connect-content-encoding",
    "grpc-timeout",
    "grpc-accept-encoding",
    "grpc-encoding",
    "x-grpc-web",
    "x-user-agent",
    "x-request-id",
    "traceparent",
    "tracestate",
    # Partial and conditional downloads from the local storage adapter's signed URLs.
    "range",
    "if-range",
    "if-none-match",
)
# Response headers that browser code must be able to read.
CORS_EXPOSED_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-request-id",
    "retry-after",
    "content-encoding",
    "connect-content-encoding",
    # Downloads from the local storage adapter's signed URLs.
    "content-disposition",
    "content-range",
    "accept-ranges",
    "etag",
)
CORS_MAX_AGE_SECONDS = 7200


class CORSMiddleware:
    """Reply to CORS preflights before auth and rate limits, and mark replies to allowed origins."""

    def __init__(self, app, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)
        self.allow_any = "*" in self.allowed_origins

    def is_allowed_origin(self, origin: str) -> bool:
        return self.allow_any or origin in self.allowed_origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        origin = header(scope, b"origin")
        if not origin:
            await self.app(scope, receive, send)
            return

        is_preflight = scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method")
        if is_preflight:
            await self._preflight(scope, send, origin)
            return

        if not self.is_allowed_origin(origin):
            await self.app(scope, receive, send)
            return

        cors_headers = [
            (b"access-control-allow-origin", origin.encode()),
            (b"access-control-expose-headers", ", ".join(CORS_EXPOSED_HEADERS).encode()),
            (b"vary", b"Origin"),
        ]

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors_headers]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, scope, send, origin: str) -> None:
        if not self.is_allowed_origin(origin):
            # No CORS headers: the browser blocks the call that would follow.
            await send({"type": "http.response.start", "status": 403, "headers": [(b"vary", b"Origin")]})
            await send({"type": "http.response.body", "body": b""})
            return

        headers = [
            (b"access-control-allow-origin", origin.encode()),
            # PUT and HEAD are for the local storage adapter's signed upload and download URLs.
            (b"access-control-allow-methods", b"GET, HEAD, POST, PUT"),
            (b"access-control-allow-headers", ", ".join(CORS_ALLOWED_HEADERS).encode()),
            (b"access-control-max-age", str(CORS_MAX_AGE_SECONDS).encode()),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


class GrpcWebTextMiddleware:
    """Serve `application/grpc-web-text` by translating it to and from binary gRPC-Web.

    connectrpc speaks binary gRPC-Web only. The text variant, used by grpc-web
    clients in `grpcwebtext` mode, is the same frames in base64.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        content_type = header(scope, b"content-type").lower()
        if scope["type"] != "http" or not content_type.startswith("application/grpc-web-text"):
            await self.app(scope, receive, send)
            return

        codec_suffix = content_type.removeprefix("application/grpc-web-text")
        binary_type = f"application/grpc-web{codec_suffix or '+proto'}".encode()
        text_type = f"application/grpc-web-text{codec_suffix or '+proto'}".encode()
        headers = [(k, binary_type if k == b"content-type" else v) for k, v in scope["headers"]]
        inner_scope = {**scope, "headers": headers}
        pending_in = bytearray()
        pending_out = bytearray()

        async def receive_decoded():
            message = await receive()
            if message["type"] != "http.request":
                return message
            pending_in.extend(message.get("body", b"").translate(None, b" \r\n\t"))
            more = message.get("more_body", False)
            # Decode whole 4-character groups; padded groups may appear mid-stream.
            usable = len(pending_in) if not more else len(pending_in) - len(pending_in) % 4
            chunk, pending_in[:] = bytes(pending_in[:usable]), pending_in[usable:]
            try:
                decoded = _decode_base64_segments(chunk)
            except binascii.Error:
                # The binary reader reports a malformed frame with the protocol's status.
                decoded = b"\xff"
            return {**message, "body": decoded}

        async def send_encoded(message) -> None:
            if message["type"] == "http.response.start":
                out_headers = [
                    (k, text_type if k == b"content-type" and v.startswith(b"application/grpc-web") else v)
                    for k, v in message.get("headers", ())
                    if k != b"content-length"
                ]
                await send({**message, "headers": out_headers})
                return
            if message["type"] == "http.response.body":
                pending_out.extend(message.get("body", b""))
                more = message.get("more_body", False)
                usable = len(pending_out) if not more else len(pending_out) - len(pending_out) % 3
                chunk, pending_out[:] = bytes(pending_out[:usable]), pending_out[usable:]
                await send({**message, "body": base64.b64encode(chunk)})
                return
            await send(message)

        await self.app(inner_scope, receive_decoded, send_encoded)


def _decode_base64_segments(data: bytes) -> bytes:
    """Decode base64 that may be several padded segments one after another."""
    out = bytearray()
    start = 0
    for index in range(0, len(data), 4):
        group = data[index : index + 4]
        if group.endswith(b"="):
            out += base64.b64decode(data[start : index + 4], validate=True)
            start = index + 4
    out += base64.b64decode(data[start:], validate=True)
    return bytes(out)


class AuthMiddleware:
    """Verify the Bearer token of each request and put the principal in a contextvar.

    This layer never rejects a call. The authorization interceptor does, once it has
    the method's policy, so public methods reply with or without a token.
    """

    def __init__(self, app, verifier) -> None:
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            values = [value for key, value in scope.get("headers", ()) if key == b"authorization"]
            if len(values) > 1:
                # Proxies disagree on which of several values counts, so none of them does.
                auth_error_var.set(
                    Unauthenticated("send one Authorization header: got several", reason="MALFORMED_AUTHORIZATION")
                )
            elif values:
                await self._authenticate(values[0].decode("latin-1"))
        await self.app(scope, receive, send)

    async def _authenticate(self, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            auth_error_var.set(
                Unauthenticated(
                    "authorization header must be 'Bearer <Firebase ID token>'", reason="MALFORMED_AUTHORIZATION"
                )
            )
            return
        try:
            principal: Principal = await self.verifier.verify(token.strip())
        except ServiceError as error:
            auth_error_var.set(error)
            return
        except Exception:
            # Fail closed: a token the verifier cannot process is not accepted.
            log.exception("token verification failed unexpectedly")
            auth_error_var.set(Unauthenticated("ID token could not be verified", reason="VERIFICATION_FAILED"))
            return
        principal_var.set(principal)


class BareRpcErrorMiddleware:
    """Add an error body to connectrpc's bodiless 404, 405 and 415 replies to Connect calls, naming what to send.

    connectrpc replies to an unknown method of a known service, a GET of a method with side
    effects and an unsupported content type with a status and no body, which leaves a curl user
    guessing. The status and headers stay, and the body becomes a Connect error naming the problem.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or detect_protocol(scope) is not Protocol.CONNECT:
            await self.app(scope, receive, send)
            return
        service, method = split_rpc_path(scope["path"])
        if not service:
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_with_body(message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in _BARE_ERROR_STATUSES:
                headers = list(message.get("headers", ()))
                if not any(key == b"content-type" for key, _ in headers):
                    replaced = True
                    code, text = _bare_error(scope, message["status"], service, method)
                    error = ConnectError(code, text, [error_info(code.name, request_id_var.get())])
                    body = connect_error_body(error)
                    headers = [
                        (key, value) for key, value in headers if key != b"content-length"
                    ] + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    await send({"type": "http.response.start", "status": message["status"], "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
            if replaced:
                # The bodiless reply's own body messages are dropped: the error body was sent.
                return
            await send(message)

        await self.app(scope, receive, send_with_body)


_BARE_ERROR_STATUSES = frozenset({404, 405, 415})


def _bare_error(scope, status: int, service: str, method: str) -> tuple[Code, str]:
    if status == 404:
        return Code.UNIMPLEMENTED, f"{service} has no method {method}: list its methods with server reflection"
    if status == 405:
        descriptor = method_descriptor(service, method)
        takes_get = descriptor is not None and descriptor.GetOptions().idempotency_level == descriptor.GetOptions().NO_SIDE_EFFECTS
        if scope["method"] == "GET" and not takes_get:
            return Code.UNIMPLEMENTED, f"{service}/{method} must be called with POST: only methods without side effects take GET"
        allowed = "POST or GET" if takes_get else "POST"
        return Code.UNIMPLEMENTED, f"{service}/{method} must be called with {allowed}: got {scope['method']}"
    sent = header(scope, b"content-type") or "no content-type"
    if _is_streaming(service, method):
        expected = "application/connect+json or application/connect+proto, with enveloped messages (a Connect streaming client)"
    else:
        expected = "application/json or application/proto"
    return Code.INVALID_ARGUMENT, f"{service}/{method} takes content-type {expected}: got {sent}"


def _is_streaming(service: str, method: str) -> bool:
    descriptor = method_descriptor(service, method)
    return descriptor is not None and (descriptor.client_streaming or descriptor.server_streaming)


class RequestBodyTimeoutMiddleware:
    """End RPCs whose request body does not arrive in time, so that a stalled client frees its slot.

    connectrpc reads a unary request's body before any deadline applies, so a client that sends
    headers and then trickles or withholds the body would hold a slot of the overload guard for
    as long as its connection stays open. Here a unary or server-streaming call's body must
    arrive within `timeout_seconds` of the call's start, and each message of a client stream
    within `timeout_seconds` of the previous one. A late body ends the call with
    deadline_exceeded. Once the body is complete or the reply has started, nothing is timed here,
    and bidirectional streams (server reflection) are not timed at all: their clients send only
    when they have something to ask, and the stream budget bounds them.
    """

    def __init__(self, app, timeout_seconds: float) -> None:
        self.app = app
        self.timeout_seconds = timeout_seconds

    async def __call__(self, scope, receive, send) -> None:
        service, method = split_rpc_path(scope["path"]) if scope["type"] == "http" else ("", "")
        if not service or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        descriptor = method_descriptor(service, method)
        if descriptor is not None and descriptor.client_streaming and descriptor.server_streaming:
            await self.app(scope, receive, send)
            return
        # A client stream's messages may come slowly; only the gaps between them are bounded.
        per_chunk = descriptor is not None and descriptor.client_streaming
        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + self.timeout_seconds
        body_complete = False
        timed_out = False
        replied = False

        async def timed_receive():
            nonlocal body_complete, timed_out, body_deadline
            if timed_out:
                return {"type": "http.disconnect"}
            if body_complete or replied:
                # Once the reply started, a timeout could no longer send its error.
                return await receive()
            if per_chunk:
                body_deadline = loop.time() + self.timeout_seconds
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                log.info("request body timed out, so the call ends", extra={"rpc_method": scope["path"], "timeout_seconds": self.timeout_seconds})
                if not replied:
                    await send_error(
                        scope, send, Code.DEADLINE_EXCEEDED,
                        f"the request body did not arrive within {self.timeout_seconds:g} s",
                        reason="REQUEST_BODY_TIMEOUT",
                    )
                return {"type": "http.disconnect"}
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_complete = True
            return message

        async def guarded_send(message) -> None:
            nonlocal replied
            if timed_out:
                # The timeout's error reply went out; whatever the call sends afterwards is dropped.
                return
            if message["type"] == "http.response.start":
                replied = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out:
                raise
            # The call failed because its client was treated as gone; the client got its error.
            log.debug("call ended after its request body timed out", exc_info=True)


class NotFoundApp:
    """Reply to paths that no service serves, in the caller's protocol."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await send_error(scope, send, Code.UNIMPLEMENTED, f"no service serves {scope['path']}", reason="UNKNOWN_METHOD")
