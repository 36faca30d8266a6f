"""The standard gRPC health service (grpc.health.v1.Health) and the HTTP probes.

grpcio-health-checking ships the google.protobuf messages. This module serves them through
connectrpc, so gRPC, gRPC-Web and Connect clients all get the same replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.server import ConnectASGIApplication, Endpoint
from grpc_health.v1 import health_pb2
from starlette.requests import Request
from starlette.responses import JSONResponse

from app.platform.context import current_request_id
from app.platform.errors import error_info
from app.platform.shutdown import SHUTDOWN_MESSAGE

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
HEALTH_SERVICE = "grpc.health.v1.Health"
# Watch streams resend the status this often, which also keeps idle proxies from closing them.
WATCH_INTERVAL_SECONDS = 15.0


class HealthService:
    """Report SERVING for the whole server ("") and each mounted service while the database responds."""

    def __init__(self, service_names: Iterable[str], is_ready: Callable[[], asyncio.Future | object]) -> None:
        self.service_names = ["", *service_names]
        self.is_ready = is_ready
        self.shutting_down = asyncio.Event()

    async def status(self, service: str) -> int:
        if service not in self.service_names:
            return SERVICE_UNKNOWN
        if self.shutting_down.is_set():
            return NOT_SERVING
        return SERVING if await self.is_ready() else NOT_SERVING

    async def check(self, request: health_pb2.HealthCheckRequest, ctx) -> health_pb2.HealthCheckResponse:
        status = await self.status(request.service)
        if status == SERVICE_UNKNOWN:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def list(self, request: health_pb2.HealthListRequest, ctx) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name in self.service_names:
            response.statuses[name].status = await self.status(name)
        return response

    async def watch(self, request: health_pb2.HealthCheckRequest, ctx) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Send the status now and every WATCH_INTERVAL_SECONDS, and end with `unavailable` once shutdown starts."""
        while True:
            yield health_pb2.HealthCheckResponse(status=await self.status(request.service))
            if self.shutting_down.is_set():
                # Clients reconnect after `unavailable`, and reach another instance because this one
                # accepts no new connections.
                raise ConnectError(
                    Code.UNAVAILABLE, SHUTDOWN_MESSAGE, [error_info("SHUTTING_DOWN", current_request_id())]
                )
            try:
                await asyncio.wait_for(self.shutting_down.wait(), WATCH_INTERVAL_SECONDS)
            except TimeoutError:
                continue


def _method(name: str, request, response, stream_type: StreamType, idempotency: IdempotencyLevel) -> MethodInfo:
    return MethodInfo(
        name=name,
        service_name=HEALTH_SERVICE,
        input=request,
        output=response,
        idempotency_level=idempotency,
        stream_type=stream_type,
    )


class HealthASGIApplication(ConnectASGIApplication[HealthService]):
    """The health service as a connectrpc application, written as protoc-gen-connectrpc would."""

    def __init__(self, service: HealthService, **options) -> None:
        super().__init__(
            service=service,
            endpoints=lambda svc: {
                f"/{HEALTH_SERVICE}/Check": Endpoint.unary(
                    method=_method(
                        "Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse,
                        StreamType.UNARY, IdempotencyLevel.NO_SIDE_EFFECTS,
                    ),
                    function=svc.check,
                ),
                f"/{HEALTH_SERVICE}/List": Endpoint.unary(
                    method=_method(
                        "List", health_pb2.HealthListRequest, health_pb2.HealthListResponse,
                        StreamType.UNARY, IdempotencyLevel.NO_SIDE_EFFECTS,
                    ),
                    function=svc.list,
                ),
                f"/{HEALTH_SERVICE}/Watch": Endpoint.server_stream(
                    method=_method(
                        "Watch", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse,
                        StreamType.SERVER_STREAM, IdempotencyLevel.NO_SIDE_EFFECTS,
                    ),
                    function=svc.watch,
                ),
            },
            **options,
        )

    @property
    def path(self) -> str:
        return f"/{HEALTH_SERVICE}"


async def healthz(request: Request) -> JSONResponse:
    """Reply 200 while the process serves requests, without calling any dependency."""
    return JSONResponse({"status": "ok"})


def readyz_endpoint(readiness_problem: Callable[[], Awaitable[str | None]]):
    """Build the readiness probe: 200 when `readiness_problem` finds none, else 503 with the problem."""

    async def readyz(request: Request) -> JSONResponse:
        problem = await readiness_problem()
        if problem is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)

    return readyz
