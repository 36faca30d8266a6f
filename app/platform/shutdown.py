"""Graceful shutdown of the uvicorn server on SIGTERM and SIGINT.

uvicorn (0.55) already stops accepting connections, lets in-flight requests finish within
`timeout_graceful_shutdown` and then runs the lifespan shutdown, which disposes the database
pool. Two things are added here:

- Server streams end first. A stream never finishes on its own, so it would hold its
  connection open for the whole grace period. DrainingServer sets the `draining` event before
  uvicorn waits for connections, and stream handlers end with `unavailable` when it is set, so
  that clients reconnect to another instance.
- The process exits with status 0. After a graceful shutdown uvicorn raises the captured signal
  again under the previous handler. The default handlers would then kill the process with
  SIGTERM, or raise KeyboardInterrupt for SIGINT, so install_exit_handlers replaces them first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "server is shutting down: reconnect to another instance"
EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that sets `draining` as its shutdown starts, before waiting for calls in flight."""

    def __init__(self, config: uvicorn.Config, draining: asyncio.Event) -> None:
        super().__init__(config)
        self.draining = draining

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info(
            "shutting down: ending streams, waiting up to %s s for calls in flight",
            self.config.timeout_graceful_shutdown,
        )
        self.draining.set()
        await super().shutdown(sockets)


def _ignore_repeated_signal(signum: int, frame: FrameType | None) -> None:
    log.debug("signal %s received after the server stopped", signal.Signals(signum).name)


def install_exit_handlers() -> None:
    """Handle SIGINT and SIGTERM in Python, so that uvicorn's re-raise after shutdown does not end the process.

    uvicorn installs its own handlers while it serves and restores these when it stops.
    """
    for signum in EXIT_SIGNALS:
        signal.signal(signum, _ignore_repeated_signal)
