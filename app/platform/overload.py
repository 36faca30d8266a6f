"""Bounded concurrency and call deadlines. NOTE: pass-through until the overload guard lands."""

from __future__ import annotations

from app.settings import Settings


class OverloadGuardMiddleware:
    """Reply `unavailable` at once when the process already handles its maximum of calls."""

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)
