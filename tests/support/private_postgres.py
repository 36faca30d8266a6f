"""A private PostgreSQL cluster for tests that stop and restart the database server.

The machine's shared Postgres serves other tests, so a test that takes the database away runs
its own cluster instead. initdb creates it in a temporary directory, postgres listens on a free
127.0.0.1 port, and pg_ctl stops and starts it again on the same port and data directory.

    with private_postgres() as cluster:
        url = cluster.create_database("functions")
        cluster.stop()   # immediate shutdown, like a crash: recovery runs at the next start
        cluster.start()

initdb and postgres refuse to run as root, so under root every command runs as the `postgres`
system user. When the binaries or that user are missing, or the cluster does not start, the
context manager skips the test with the reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

# Debian and Ubuntu install each major version's server binaries here.
DEBIAN_BINARIES = Path("/usr/lib/postgresql")
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 30
STOP_MODES = ("smart", "fast", "immediate")
LOG_TAIL_CHARACTERS = 4000


class PrivatePostgresError(RuntimeError):
    """A pg_ctl, initdb or psql command of the private cluster failed."""


def find_binaries() -> Path | None:
    """Return the directory holding initdb, pg_ctl and postgres, preferring the newest major version."""
    candidates: list[Path] = []
    if DEBIAN_BINARIES.is_dir():
        versions = [path for path in DEBIAN_BINARIES.iterdir() if path.name.isdigit()]
        candidates += [path / "bin" for path in sorted(versions, key=lambda path: int(path.name), reverse=True)]
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "pg_ctl", "postgres", "psql")):
            return directory
    return None


def missing_prerequisite() -> str | None:
    """Return why a private cluster cannot run on this machine, or None when it can."""
    if find_binaries() is None:
        return (
            f"initdb, pg_ctl, postgres and psql were not found under {DEBIAN_BINARIES}/<version>/bin or on PATH: "
            "install the Debian package 'postgresql' to run the private-cluster tests"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"initdb refuses to run as root and the system user {SYSTEM_USER!r} does not exist"
    return None


@dataclass
class PrivatePostgres:
    """One PostgreSQL cluster in `directory`, listening on 127.0.0.1:`port`."""

    binaries: Path
    directory: Path
    port: int
    # The system user that runs every command, or None to run as the current user.
    run_as: str | None

    @property
    def data_directory(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def is_running(self) -> bool:
        return (self.data_directory / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        """Return the SQLAlchemy asyncpg URL of `database` on this cluster."""
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def initialize(self) -> None:
        """Create the data directory: trust authentication, loopback TCP only, durability off for speed."""
        self._give_to_user(self.directory)
        self._run(
            "initdb", "--pgdata", str(self.data_directory), "--username", SUPERUSER, "--auth", "trust",
            "--encoding", "UTF8", "--no-locale", "--no-sync",
        )
        sockets = self.directory / "sockets"
        sockets.mkdir()
        self._give_to_user(sockets)
        # fsync off loses data only when the operating system crashes, and a test cluster is
        # thrown away then anyway. synchronous_commit must stay on, because with it off a commit
        # returns before its WAL leaves postgres's shared memory, and an immediate stop then loses
        # commits that clients already received as successful.
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{sockets}'",
            "fsync": "off",
            "full_page_writes": "off",
        }
        with (self.data_directory / "postgresql.conf").open("a") as config:
            config.write("\n# Set by tests/support/private_postgres.py\n")
            config.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self, timeout_seconds: int = START_TIMEOUT_SECONDS) -> None:
        """Start postgres on the cluster's port and wait until it accepts connections."""
        self._run(
            "pg_ctl", "start", "--pgdata", str(self.data_directory), "--log", str(self.log_path),
            "--wait", "--timeout", str(timeout_seconds), timeout=timeout_seconds + 10,
        )

    def stop(self, mode: str = "immediate", timeout_seconds: int = STOP_TIMEOUT_SECONDS) -> None:
        """Stop postgres and wait until it has exited.

        `immediate` ends every backend at once without a checkpoint, as a crash would, and the
        next start runs crash recovery. `fast` rolls back open transactions and shuts down cleanly.
        """
        if mode not in STOP_MODES:
            raise ValueError(f"mode must be one of {', '.join(STOP_MODES)}: got {mode!r}")
        self._run(
            "pg_ctl", "stop", "--pgdata", str(self.data_directory), "--mode", mode,
            "--wait", "--timeout", str(timeout_seconds), timeout=timeout_seconds + 10,
        )

    def create_database(self, name: str) -> str:
        """Create database `name` and return its asyncpg URL."""
        self._run(
            "psql", "--no-psqlrc", "--host", "127.0.0.1", "--port", str(self.port), "--username", SUPERUSER,
            "--dbname", "postgres", "--set", "ON_ERROR_STOP=1", "--command", f'CREATE DATABASE "{name}"',
        )
        return self.url(name)

    def log_tail(self) -> str:
        """Return the end of the server log, for failure messages."""
        if not self.log_path.exists():
            return "(no server log)"
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARACTERS:]

    def _run(self, program: str, *arguments: str, timeout: float = 60) -> None:
        # A minimal environment, so that PGHOST, PGPORT or PGDATA of the caller cannot redirect a command.
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        user_options = {}
        if self.run_as is not None:
            # extra_groups=[] drops root's supplementary groups along with its uid.
            user_options = {"user": self.run_as, "group": pwd.getpwnam(self.run_as).pw_gid, "extra_groups": []}
        # pg_ctl's --log sends postgres's own output to the log file, so postgres keeps none of
        # these pipes open and the call returns once pg_ctl exits.
        result = subprocess.run(
            [str(self.binaries / program), *arguments], cwd=self.directory, env=environment,
            capture_output=True, text=True, timeout=timeout, check=False, **user_options,
        )
        if result.returncode != 0:
            raise PrivatePostgresError(
                f"{program} {arguments[0]} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\nserver log:\n{self.log_tail()}"
            )

    def _give_to_user(self, path: Path) -> None:
        if self.run_as is not None:
            account = pwd.getpwnam(self.run_as)
            os.chown(path, account.pw_uid, account.pw_gid)

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_directory / "postmaster.pid").read_text().splitlines()[0])
        return None

    def remove(self) -> None:
        """Stop postgres if it runs, then delete the cluster's directory."""
        if self.is_running:
            try:
                self.stop("immediate")
            except (PrivatePostgresError, subprocess.TimeoutExpired):
                # SIGQUIT is postgres's own immediate shutdown, sent to the postmaster's process id.
                pid = self._postmaster_pid()
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGQUIT)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """Yield a started private cluster, then stop it and remove its files.

    Skips the calling test when the cluster cannot be created or started, with the reason.
    """
    reason = missing_prerequisite()
    if reason is not None:
        pytest.skip(reason)
    binaries = find_binaries()
    assert binaries is not None
    run_as = SYSTEM_USER if os.geteuid() == 0 else None

    # Under /tmp rather than pytest's tmp_path: pytest's directories are private to root, so the
    # postgres user could not enter them, and a short path keeps the Unix socket path within
    # its 107-byte limit.
    cluster = PrivatePostgres(binaries, Path(tempfile.mkdtemp(prefix="private-postgres-")), free_port(), run_as)
    try:
        try:
            cluster.initialize()
            cluster.start()
        except (PrivatePostgresError, subprocess.TimeoutExpired, OSError) as error:
            pytest.skip(f"the private PostgreSQL cluster did not start: {error}")
        yield cluster
    finally:
        cluster.remove()
