"""Per-caller rate limits of RPCs. NOTE: pass-through until the rate limiter lands."""

from __future__ import annotations

from app.settings import Settings


class RateLimitMiddleware:
    """Reject calls over their method's rate limit with resource_exhausted."""

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)
