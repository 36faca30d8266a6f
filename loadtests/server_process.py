"""The server under test: start and stop it, read its CPU time and memory from /proc, read its log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtests.scenarios import BenchmarkError

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_stat_fields(pid: int) -> list[str]:
    """Return the fields of /proc/<pid>/stat after the command name, which may contain spaces."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """Return root and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(read_stat_fields(int(entry.name))[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(root: int) -> tuple[float, float]:
    """Return the user and the system CPU time of root, its live descendants and the children they reaped."""
    user_ticks = system_ticks = 0
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            fields = read_stat_fields(pid)
            # Fields 14-17 of proc(5) are utime, stime, cutime and cstime; this list starts at field 3.
            utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
            user_ticks += utime + cutime
            system_ticks += stime + cstime
    return user_ticks / CLOCK_TICKS_PER_SECOND, system_ticks / CLOCK_TICKS_PER_SECOND


def status_kib(pid: int, key: str) -> int:
    """Return a memory line of /proc/<pid>/status (VmHWM, VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"/proc/{pid}/status has no {key} line")


def find_application_process(root: int) -> int:
    """Return the process that runs the ASGI application.

    uvicorn runs it in the process it was started as. pyvoy's launcher is a Python process that
    starts Envoy, and Envoy runs the application in its own process through the _pyvoy module.
    """
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            if "_pyvoy" in Path(f"/proc/{pid}/maps").read_text():
                return pid
    return root


class BenchServer:
    """`python -m app serve` in a subprocess, with its output in a log file."""

    def __init__(self, server: str, env: dict[str, str], log_path: Path) -> None:
        self.server = server
        self.port = free_port()
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchmarkError(f"{self.server} is not started")
        return self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def start(self) -> None:
        """Start the server and wait until /healthz returns 200."""
        command = [
            sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--server", self.server,
        ]
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)

        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"{self.server} exited with status {self.process.returncode} during startup; "
                    f"its log ends with:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise BenchmarkError(
            f"{self.server} did not return 200 on /healthz within {STARTUP_TIMEOUT_SECONDS:.0f} s; its log ends with:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Send SIGTERM and wait; kill the server's processes by id if it does not exit in time."""
        if not self.is_running():
            return
        pids = descendants(self.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"{self.server} did not stop within {STOP_TIMEOUT_SECONDS:.0f} s of SIGTERM: killing pids {pids}", file=sys.stderr)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait()

    def read_log(self, start: int, end: int) -> LogSummary:
        """Summarize the log between two byte offsets: access-log lines and errors."""
        summary = LogSummary()
        with self.log_path.open("rb") as log_file:
            log_file.seek(start)
            chunk = log_file.read(end - start)
        for line in chunk.splitlines():
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    summary.add_entry(json.loads(line))
            elif line.startswith(b"Exception in ASGI application"):
                # pyvoy prints application exceptions to stderr itself, outside the logging setup.
                summary.errors[line.decode(errors="replace")] += 1
        return summary


@dataclass
class LogSummary:
    """The server's log lines of one run: access-log counts and ERROR messages."""

    # (path, HTTP status, gRPC status) -> number of access-log lines
    calls: Counter = field(default_factory=Counter)
    # logger, message and the exception's last line -> number of ERROR or CRITICAL lines
    errors: Counter = field(default_factory=Counter)
    # ERROR lines whose exception is a CancelledError. A call that the load generator cuts off at
    # the deadline can log one (SQLAlchemy's pool logs a cancelled connection reset), so up to one
    # per connection is expected.
    cancellations: int = 0

    def add_entry(self, entry: dict) -> None:
        if entry.get("logger") == "app.access":
            self.calls[(entry.get("rpc_method"), entry.get("http_status"), entry.get("grpc_status") or "")] += 1
        elif entry.get("level") in ("ERROR", "CRITICAL"):
            exception = str(entry.get("exception", "")).strip().splitlines()
            if exception and exception[-1] == "asyncio.exceptions.CancelledError":
                self.cancellations += 1
                return
            # Messages that name an object carry its address; the text before it groups repeats.
            message = str(entry.get("message", "")).split(" at 0x")[0][:120]
            self.errors[f"{entry.get('logger')}: {message}: {exception[-1][:160] if exception else ''}"] += 1


def count_logged_calls(path: str, counts: Counter, connections: int) -> tuple[int, list[str]]:
    """Return the calls to `path` that the server logged as OK, and a description of each failure.

    The load generators stop at a deadline and cut off the calls in flight. The server logs those
    as canceled (HTTP 499 or grpc-status 1), and up to one per connection is expected.
    """
    ok = canceled = 0
    failures = []
    for (logged_path, http_status, grpc_status), count in counts.items():
        if logged_path != path:
            continue
        if http_status == 200 and grpc_status in ("", "0"):
            ok += count
        elif http_status == 499 or grpc_status == "1":
            canceled += count
        else:
            failures.append(f"{count} x HTTP {http_status} grpc-status {grpc_status or '-'}")
    if canceled > connections:
        failures.append(f"{canceled} canceled calls, more than the {connections} in flight at the deadline")
    return ok, failures
