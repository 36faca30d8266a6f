"""Traces and metrics of every call. NOTE: pass-through until tracing and metrics land."""

from __future__ import annotations

from starlette.routing import Route

from app.settings import Settings


class ObservabilityMiddleware:
    """Open a server span per request and record its metrics."""

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def configure_observability(settings: Settings, database) -> None:
    """Set up tracing (and its exporter) and instrument the database engine."""


def metrics_routes(settings: Settings) -> list[Route]:
    """Return the /metrics route when metrics are served on the main port."""
    return []
