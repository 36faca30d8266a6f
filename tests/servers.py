"""Start the real service in a subprocess on a loopback socket, for end-to-end tests.

    with run_server({"DATABASE_URL": ...}) as server:
        httpx.post(f"{server.url}/functions.user.v1.UserService/GetMe", ...)

The server is `python -m app serve`, exactly as `make run` starts it; its log goes to a file
that a failing test can print. Stopping sends SIGTERM to the process id and waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_SECONDS = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it to exit; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def run_migrations(env: dict[str, str]) -> None:
    """Apply the migrations to the database named by env's DATABASE_URL."""
    subprocess.run(
        [sys.executable, "-m", "app", "migrate"], env={**os.environ, **env}, cwd=ROOT, check=True,
        capture_output=True, timeout=120,
    )


def start_server(env: dict[str, str], log_path: Path, *, server: str = "uvicorn") -> RunningServer:
    """Start `python -m app serve` on a free port and wait until /healthz replies."""
    port = free_port()
    full_env = {**os.environ, "APP_ENV": "test", "LOG_LEVEL": "INFO", **env}
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port), "--server", server],
        env=full_env,
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    running = RunningServer(process, port, log_path)

    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} during startup:\n{running.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{running.url}/healthz", timeout=1.0).status_code == 200:
                return running
        time.sleep(0.1)
    running.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not answer /healthz within {STARTUP_TIMEOUT_SECONDS} s:\n{running.log()}")


@contextlib.contextmanager
def run_server(env: dict[str, str], log_path: Path, *, server: str = "uvicorn") -> Iterator[RunningServer]:
    """Run the server for the duration of the block."""
    running = start_server(env, log_path, server=server)
    try:
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Serve an ASGI app in this process with uvicorn (HTTP/1.1 and h2c); yield its host:port.

    For tests that need their own handlers behind the real middleware stack.
    """
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http="zttp", http2=True, lifespan="off", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-process server did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
