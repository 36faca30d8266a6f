"""A clock that tests move by hand, for code that takes a `clock` callable."""

from __future__ import annotations


class FakeClock:
    """Returns `now` when called; `advance(seconds)` moves it forward."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by this many seconds."""
        self.now += seconds
