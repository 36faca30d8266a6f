"""Traces and metrics of every call: an OpenTelemetry server span and Prometheus metrics per RPC.

Tracing is off unless OTEL_EXPORTER_OTLP_ENDPOINT is set (or a test calls `enable_tracing`).
Off, no TracerProvider exists, and the middleware only updates the Prometheus metrics. On, each
RPC gets one SERVER span named `<service>/<method>`, child of the caller's W3C `traceparent`,
with child spans for the SQL statements of the database engine and for outgoing httpx requests.

Metrics live in `REGISTRY`, a CollectorRegistry of their own, so that library defaults (process
and GC collectors of prometheus_client's global registry) stay out. With METRICS_PORT=0 they are
served at /metrics on the main port; with another port, a separate listener on HOST serves them.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
import threading
import time
import weakref

from connectrpc.code import Code
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.platform.context import auth_error_var, request_id_var, trace_id_var
from app.platform.middleware import RPC_CODE_SCOPE_KEY
from app.platform.wire import GRPC_STATUS, Protocol, detect_protocol, split_rpc_path
from app.settings import Settings

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

RPC_REQUESTS = Counter(
    "rpc_server_requests", "RPCs handled, by method and code.", ["method", "code"], registry=REGISTRY
)
RPC_DURATION = Histogram(
    "rpc_server_duration_seconds",
    "Time from the request's arrival to the end of the reply, by method.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
RPC_IN_FLIGHT = Gauge("rpc_server_in_flight_requests", "RPCs being handled right now.", registry=REGISTRY)
AUTH_FAILURES = Counter(
    "auth_failures", "Calls whose credentials were rejected, by reason (MISSING_TOKEN, EXPIRED, ...).",
    ["reason"], registry=REGISTRY,
)
RATE_LIMIT_REJECTIONS = Counter(
    "rate_limit_rejections", "Calls answered with resource_exhausted, by method.", ["method"], registry=REGISTRY
)

# Paths that are not RPCs: probes and the scrape itself get neither spans nor RPC metrics.
_UNTRACKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Non-RPC paths that end in an object key: the local storage adapter's signed URLs.
_KEYED_PATH_PREFIXES = ("/storage/v1/local/",)
# Callers choose the path, so method labels are capped: later unknown names count as "other".
MAX_METHOD_LABELS = 256
OTHER_METHOD = "other"
# Enough for any Connect error body or gRPC-Web trailer frame this service sends.
_MAX_KEPT_BODY_BYTES = 8192

_CODE_BY_GRPC_STATUS = {number: code.value for code, number in GRPC_STATUS.items()} | {0: "ok"}
# Codes that mean the server failed, which mark a SERVER span as an error (OpenTelemetry RPC conventions).
_SERVER_ERROR_CODES = frozenset({"unknown", "deadline_exceeded", "unimplemented", "internal", "unavailable", "data_loss"})
# Code of a reply that carries no RPC status, from its HTTP status (gRPC's HTTP-to-status mapping).
_CODE_BY_HTTP_STATUS = {
    400: "internal",
    401: "unauthenticated",
    403: "permission_denied",
    404: "unimplemented",
    429: "unavailable",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}


_tracer: trace.Tracer | None = None
_method_labels: set[str] = set()
_metric_children: dict[tuple[str, str], tuple] = {}
_method_labels_lock = threading.Lock()
_traced_engines: weakref.WeakSet = weakref.WeakSet()
_metrics_server_lock = threading.Lock()
_metrics_server_port: int | None = None


class ObservabilityMiddleware:
    """Open a server span per request and record the metrics of RPCs."""

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNTRACKED_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return

        reply = ReplyRecorder(detect_protocol(scope))
        if not split_rpc_path(scope["path"])[0]:
            # Not an RPC, such as a signed-URL download: a span, but no RPC code or metrics.
            if _tracer is None:
                await self.app(scope, receive, send)
            else:
                await self._call_traced(_tracer, scope, receive, send, reply)
            return

        started = time.perf_counter()
        RPC_IN_FLIGHT.inc()
        try:
            if _tracer is None:
                await self.app(scope, receive, reply.wrap(send))
            else:
                await self._call_traced(_tracer, scope, receive, send, reply)
        finally:
            RPC_IN_FLIGHT.dec()
            code = reply.code()
            # The access log line of RequestContextMiddleware, further out, reports this code.
            scope[RPC_CODE_SCOPE_KEY] = code
            _record_metrics(scope["path"], code, time.perf_counter() - started)

    async def _call_traced(self, tracer: trace.Tracer, scope, receive, send, reply: ReplyRecorder) -> None:
        parent = propagate.extract(scope["headers"], getter=_SCOPE_HEADERS)
        service, method = split_rpc_path(scope["path"])
        attributes = {
            "rpc.system": "connect_rpc" if reply.protocol is Protocol.CONNECT else "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "url.path": scope["path"] if service else _route_of(scope["path"]),
            "http.request.method": scope["method"],
            "app.request_id": request_id_var.get() or "",
        }
        name = f"{service}/{method}" if service else f"{scope['method']} {_route_of(scope['path'])}"
        with tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes, set_status_on_exception=True
        ) as span:
            # Not reset on purpose: the access log line is written by the outer RequestContextMiddleware
            # after this span ends. uvicorn runs each request in its own task, so the value stays in that request.
            trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
            try:
                await self.app(scope, receive, reply.wrap(send))
            finally:
                _finish_span(span, reply)


class ReplyRecorder:
    """Watch the reply of one call and work out its RPC code in any protocol."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.http_status = 0
        self.content_type = ""
        # The compression of a Connect stream's frames, which its end-stream frame may use too.
        self.stream_encoding = ""
        self.grpc_status = ""
        self.body = bytearray()

    def wrap(self, send):
        async def send_and_record(message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.http_status = message["status"]
                headers = message.get("headers", ())
                self.grpc_status = _grpc_status(headers)
                self.content_type = _content_type(headers)
                self.stream_encoding = _header(headers, b"connect-content-encoding")
            elif kind == "http.response.trailers":
                self.grpc_status = _grpc_status(message.get("headers", ())) or self.grpc_status
            elif kind == "http.response.body" and self._keeps_body():
                chunk = message.get("body", b"")
                if chunk and self.content_type.startswith("application/grpc-web-text"):
                    # Each chunk is base64 of its own, and the last one contains the trailer frame.
                    self.body[:] = chunk
                elif chunk:
                    # The status is at the end of the reply, so the last bytes are the ones kept.
                    self.body.extend(chunk)
                    del self.body[:-_MAX_KEPT_BODY_BYTES]
            await send(message)

        return send_and_record

    def _keeps_body(self) -> bool:
        if self.protocol is Protocol.CONNECT:
            # A Connect unary error is a JSON body, and a stream ends with an end-stream frame.
            return self.http_status != 200 or self.content_type.startswith("application/connect+")
        # gRPC-Web puts the status of a reply with messages in a trailer frame in the body.
        return self.protocol is Protocol.GRPC_WEB and not self.grpc_status

    def code(self) -> str:
        """Return the Connect name of the reply's code ("ok", "not_found", ...), or "unknown"."""
        if self.http_status == 0:
            # The app raised before replying, so the server replies with 500.
            return "unknown"
        if self.protocol is Protocol.CONNECT:
            return self._connect_code()
        status = self.grpc_status or self._grpc_web_trailer_status()
        if status:
            return _CODE_BY_GRPC_STATUS.get(int(status), "unknown") if status.isdigit() else "unknown"
        return _CODE_BY_HTTP_STATUS.get(self.http_status, "unknown")

    def _connect_code(self) -> str:
        if self.content_type.startswith("application/connect+"):
            return _end_stream_code(bytes(self.body), self.stream_encoding) if self.http_status == 200 else self._http_code()
        if self.http_status == 200:
            return "ok"
        try:
            code = json.loads(self.body).get("code")
        except (ValueError, AttributeError):
            code = None
        return code if isinstance(code, str) and code else self._http_code()

    def _http_code(self) -> str:
        return _CODE_BY_HTTP_STATUS.get(self.http_status, "unknown")

    def _grpc_web_trailer_status(self) -> str:
        body = bytes(self.body)
        if self.content_type.startswith("application/grpc-web-text"):
            # GrpcWebTextMiddleware runs further in, so this layer receives the base64 text.
            try:
                body = base64.b64decode(body)
            except binascii.Error:
                return ""
        return _grpc_web_status(body)


def _end_stream_code(body: bytes, encoding: str = "") -> str:
    """Return the code of a Connect stream's end-stream frame: flags 0x02 (0x03 when compressed), then a JSON object."""
    for marker in range(len(body) - 5, -1, -1):
        flags = body[marker]
        frame = body[marker + 5 :]
        if flags not in (0x02, 0x03) or int.from_bytes(body[marker + 1 : marker + 5], "big") != len(frame):
            continue
        try:
            if flags & 0x01:
                if encoding != "gzip":
                    return "unknown"
                frame = gzip.decompress(frame)
            end = json.loads(frame or b"{}")
        except (ValueError, OSError, EOFError):
            return "unknown"
        error = end.get("error") if isinstance(end, dict) else None
        return str(error.get("code") or "unknown") if isinstance(error, dict) else "ok"
    return "unknown"


def _header(headers, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1").lower()
    return ""


def _content_type(headers) -> str:
    return _header(headers, b"content-type")


def _route_of(path: str) -> str:
    """Return the path of a non-RPC request with its object key replaced by `{key}`.

    The key names a user and a file, which belong neither in span names nor in attributes.
    """
    for prefix in _KEYED_PATH_PREFIXES:
        if path.startswith(prefix):
            return prefix + "{key}"
    return path


def method_label(path: str, code: str) -> str:
    """Return the metrics label of a call's method: `<service>/<method>`, or "other" for unknown paths."""
    service, method = split_rpc_path(path)
    if not service or code == "unimplemented":
        return OTHER_METHOD
    label = f"{service}/{method}"
    if label in _method_labels:
        return label
    with _method_labels_lock:
        if len(_method_labels) >= MAX_METHOD_LABELS:
            return OTHER_METHOD
        _method_labels.add(label)
    return label


def _record_metrics(path: str, code: str, seconds: float) -> None:
    method = method_label(path, code)
    requests, duration = _children(method, code)
    requests.inc()
    duration.observe(seconds)

    # NOTE: every resource_exhausted reply counts as a rate-limit rejection, because the rate
    # limiter is the only source of that code today. A handler that sends it would count too.
    if code == "resource_exhausted":
        RATE_LIMIT_REJECTIONS.labels(method).inc()

    auth_error = auth_error_var.get()
    if auth_error is not None:
        AUTH_FAILURES.labels(getattr(auth_error, "reason", None) or type(auth_error).__name__).inc()
    elif code == "unauthenticated":
        AUTH_FAILURES.labels("MISSING_TOKEN").inc()


def _children(method: str, code: str) -> tuple:
    """Return the request counter and latency histogram of a method and code, cached.

    `labels()` takes a lock and builds a key on every call, so the cache keeps that off the
    per-call path. Its size is bounded by MAX_METHOD_LABELS times the number of codes.
    """
    key = (method, code)
    children = _metric_children.get(key)
    if children is None:
        children = (RPC_REQUESTS.labels(method, code), RPC_DURATION.labels(method))
        _metric_children[key] = children
    return children


def _finish_span(span: trace.Span, reply: ReplyRecorder) -> None:
    code = reply.code()
    span.set_attribute("http.response.status_code", reply.http_status)
    if reply.protocol is Protocol.CONNECT:
        if code != "ok":
            span.set_attribute("rpc.connect_rpc.error_code", code)
    else:
        span.set_attribute("rpc.grpc.status_code", _grpc_status_number(code))
    if code == "unimplemented":
        span.update_name(OTHER_METHOD)
    if code in _SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code))


def _grpc_status_number(code: str) -> int:
    if code == "ok":
        return 0
    try:
        return GRPC_STATUS[Code(code)]
    except (ValueError, KeyError):
        return 2


class _ScopeHeaderGetter(Getter):
    """Read W3C trace context headers straight from an ASGI scope's header list."""

    def get(self, carrier, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header_name, value in carrier if header_name == name]
        return values or None

    def keys(self, carrier) -> list[str]:
        return [header_name.decode("latin-1") for header_name, _ in carrier]


_SCOPE_HEADERS = _ScopeHeaderGetter()


class TraceContextFilter(logging.Filter):
    """Add the trace id and span id of the current request to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is not None:
            return True
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = trace_id_var.get()
        return True


class DatabasePoolCollector:
    """Report the connection pool of the configured database at scrape time."""

    def __init__(self) -> None:
        self._engine_ref: weakref.ref | None = None

    def watch(self, database) -> None:
        """Report this database's pool from now on. A process reports one pool: the last one watched."""
        self._engine_ref = weakref.ref(database.engine.sync_engine)

    def describe(self):
        return []

    def collect(self):
        engine = self._engine_ref() if self._engine_ref is not None else None
        pool = engine.pool if engine is not None else None
        # StaticPool (in-memory SQLite) keeps one connection and has no counts to report.
        if pool is None or not hasattr(pool, "checkedout"):
            return
        checked_out = GaugeMetricFamily("db_pool_checked_out_connections", "Connections lent to callers right now.")
        checked_out.add_metric([], pool.checkedout())
        yield checked_out
        size = GaugeMetricFamily("db_pool_size_connections", "Connections the pool keeps (DATABASE_POOL_SIZE).")
        size.add_metric([], pool.size())
        yield size
        overflow = GaugeMetricFamily(
            "db_pool_overflow_connections", "Connections open beyond the pool size (negative: unopened pool slots)."
        )
        overflow.add_metric([], pool.overflow())
        yield overflow


DATABASE_POOL = DatabasePoolCollector()
REGISTRY.register(DATABASE_POOL)


def enable_tracing(tracer_provider: trace.TracerProvider, database=None) -> None:
    """Trace every RPC with this provider, and the SQL statements of `database`'s engine."""
    global _tracer
    _tracer = tracer_provider.get_tracer(__name__)
    if database is not None:
        trace_engine(tracer_provider, database.engine.sync_engine)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
            handler.addFilter(TraceContextFilter())


def disable_tracing() -> None:
    """Stop opening server spans; engines already traced keep their SQL spans."""
    global _tracer
    _tracer = None


def trace_engine(tracer_provider: trace.TracerProvider, sync_engine) -> None:
    """Open a child span for every SQL statement of this engine, once per engine."""
    from opentelemetry.instrumentation.sqlalchemy import (
        __version__ as sqlalchemy_instrumentation_version,
    )
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.metrics import NoOpMeterProvider

    if sync_engine in _traced_engines:
        return
    # EngineTracer is what SQLAlchemyInstrumentor attaches per engine. Used directly, it traces
    # this engine only, where the instrumentor also patches create_engine for the whole process.
    tracer = tracer_provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", sqlalchemy_instrumentation_version)
    usage = NoOpMeterProvider().get_meter(__name__).create_up_down_counter("db.client.connections.usage")
    EngineTracer(tracer, sync_engine, usage)
    _traced_engines.add(sync_engine)


def configure_observability(settings: Settings, database) -> None:
    """Set up tracing (and its exporter) and instrument the database engine."""
    DATABASE_POOL.watch(database)
    if settings.metrics_port:
        start_metrics_server(settings.host, settings.metrics_port)
    if not settings.otel_exporter_otlp_endpoint:
        return

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otel_service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    # Global, so that libraries which trace through the OpenTelemetry API report here too.
    # OpenTelemetry keeps the first provider set in a process and warns about later ones.
    trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    enable_tracing(provider, database)
    log.info("exporting traces to %s", endpoint, extra={"otel_service_name": settings.otel_service_name})


def start_metrics_server(host: str, port: int) -> None:
    """Serve the metrics at http://host:port/metrics from a thread, once per process."""
    from prometheus_client import start_http_server

    global _metrics_server_port
    with _metrics_server_lock:
        if _metrics_server_port is not None:
            if _metrics_server_port != port:
                log.warning("metrics are already served on port %d, so METRICS_PORT=%d is ignored", _metrics_server_port, port)
            return
        start_http_server(port, addr=host, registry=REGISTRY)
        _metrics_server_port = port
    log.info("serving metrics on %s:%d", host, port)


async def metrics_endpoint(request: Request) -> Response:
    """Reply with every metric in the Prometheus text format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def metrics_routes(settings: Settings) -> list[Route]:
    """Return the /metrics route when metrics are served on the main port."""
    if settings.metrics_port:
        return []
    return [Route("/metrics", metrics_endpoint, methods=["GET"])]



def _grpc_status(headers) -> str:
    for key, value in headers:
        if key == b"grpc-status":
            return value.decode()
    return ""


def _grpc_web_status(body: bytes) -> str:
    # A gRPC-Web trailer frame starts with flag 0x80 and contains "grpc-status: N".
    marker = body.rfind(b"grpc-status:")
    if marker < 0:
        return ""
    line = body[marker + len(b"grpc-status:") :].split(b"\r\n", 1)[0]
    return line.strip().decode(errors="replace")
