"""A real HTTP server on 127.0.0.1 that serves a certificate document from a background thread."""

from __future__ import annotations

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


class CertificateServer:
    """Serves a certificate document on every GET path and counts the requests.

    The attributes may be changed while it runs: `document` (a dict, sent as JSON, or raw bytes),
    `max_age` (the Cache-Control max-age, None for no Cache-Control), `status` (the HTTP status)
    and `delay_seconds` (how long each response waits before it is sent).
    """

    def __init__(self, document: dict[str, Any] | bytes, *, max_age: int | None = 3600) -> None:
        self.document = document
        self.max_age = max_age
        self.status = 200
        self.delay_seconds = 0.0
        self._count = 0
        self._count_lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Return the URL of the certificate document."""
        assert self._server is not None, "start the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/certs.json"

    @property
    def request_count(self) -> int:
        """Return how many requests arrived since the start."""
        with self._count_lock:
            return self._count

    def start(self) -> CertificateServer:
        """Bind a free loopback port and serve in a background thread."""
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        # A short poll interval keeps stop() fast: shutdown() waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="certificate-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end delayed responses without a response and close the socket."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> CertificateServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        with self._count_lock:
            self._count += 1
        if self.delay_seconds and self._stopping.wait(self.delay_seconds):
            return

        document = self.document
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        handler.send_response(self.status)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(body)))
        if self.max_age is not None:
            handler.send_header("Cache-Control", f"public, max-age={self.max_age}, must-revalidate, no-transform")
        handler.end_headers()
        handler.wfile.write(body)


class _Server(ThreadingHTTPServer):
    # Non-daemon request threads, so server_close() waits for them and none outlives the test.
    daemon_threads = False
    owner: CertificateServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has closed its socket before a delayed response is written.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.owner._respond(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def unused_loopback_url() -> str:
    """Return an http:// URL on 127.0.0.1 where nothing listens, so connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # NOTE: another process may bind the port between this return and its use; unlikely in tests.
    return f"http://127.0.0.1:{port}/certs.json"
