"""A short headless locust run of loadtests/locustfile.py against a real server.

Locust patches the standard library for gevent, so it runs in its own process. The server
verifies development tokens with a key pair in a temporary directory, and the locust process
mints its users' tokens with the same key pair.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.platform.auth import ensure_dev_keys, mint_token
from app.settings import DEV_PROJECT_ID
from tests.servers import ROOT, RunningServer, run_migrations, run_server

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
RUN_SECONDS = 5
LOCUST_TIMEOUT_SECONDS = 60
EXPECTED_CALLS = {
    ("POST", "/functions.user.v1.UserService/GetMe"),
    ("POST", "/functions.user.v1.UserService/ListUsers"),
    ("grpc", "/functions.user.v1.UserService/GetMe"),
    ("grpc", "/functions.user.v1.UserService/ListUsers"),
}


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("locust-server")
    return {
        "APP_ENV": "test",
        "DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'locust.db'}",
        # No FIREBASE_CERTS_URL: the server trusts the development key pair that locust mints with.
        "DEV_KEYS_DIR": str(directory / "dev-keys"),
        "FIREBASE_AUTH_EMULATOR_HOST": "",
        "ENABLED_SERVICES": "auth,users",
    }


@pytest.fixture(scope="module")
def server(environment, tmp_path_factory) -> Iterator[RunningServer]:
    run_migrations(environment)
    with run_server(environment, tmp_path_factory.mktemp("locust-log") / "server.log") as running:
        yield running


def run_locust(
    server: RunningServer, environment: dict[str, str], csv_prefix: Path, *, seconds: int = RUN_SECONDS,
    locustfile: Path = LOCUSTFILE, users: int = 6,
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", server.url,
        "--only-summary", "--exit-code-on-error", "1", "--csv", str(csv_prefix),
    ]
    # LOCUST_ variables or a FIREBASE_CERTS_URL in the caller's shell would make locust read
    # token files or refuse to mint development tokens.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(("LOCUST_", "FIREBASE_CERTS_URL"))}
    return subprocess.run(
        command, env={**inherited, **environment}, cwd=ROOT, capture_output=True, text=True,
        timeout=LOCUST_TIMEOUT_SECONDS,
    )


def read_stats(csv_prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv", newline="") as file:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(file) if row["Name"] != "Aggregated"}


def test_locust_run_succeeds_over_both_protocols(server, environment, tmp_path):
    csv_prefix = tmp_path / "locust"

    result = run_locust(server, environment, csv_prefix)
    stats = read_stats(csv_prefix)
    output = f"locust output:\n{result.stdout}\n{result.stderr}\nserver log:\n{server.log()}"

    assert result.returncode == 0, output
    assert EXPECTED_CALLS <= stats.keys(), output
    assert {request_type for request_type, _ in stats} == {"POST", "grpc"}, output
    failures = {key: row["Failure Count"] for key, row in stats.items() if row["Failure Count"] != "0"}
    assert failures == {}, output
    requests = {key: int(row["Request Count"]) for key, row in stats.items()}
    assert all(count > 0 for count in requests.values()), requests


def test_rejected_tokens_count_as_failures(server, environment, tmp_path):
    # Tokens from a key pair the server does not trust: every call ends unauthenticated.
    foreign_keys = ensure_dev_keys(tmp_path / "foreign-keys")
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(mint_token(foreign_keys, project_id=DEV_PROJECT_ID, uid="intruder") + "\n")
    admin_tokens_file = tmp_path / "admin-tokens.txt"
    admin_tokens_file.write_text(
        mint_token(foreign_keys, project_id=DEV_PROJECT_ID, uid="intruder-admin", roles=["admin"]) + "\n"
    )
    csv_prefix = tmp_path / "locust"

    result = run_locust(
        server,
        {**environment, "LOCUST_TOKENS_FILE": str(tokens_file), "LOCUST_ADMIN_TOKENS_FILE": str(admin_tokens_file)},
        csv_prefix,
        seconds=2,
    )
    stats = read_stats(csv_prefix)
    output = f"locust output:\n{result.stdout}\n{result.stderr}"

    assert result.returncode == 1, output
    assert EXPECTED_CALLS <= stats.keys(), output
    unfailed = {key: row for key, row in stats.items() if row["Failure Count"] != row["Request Count"]}
    assert unfailed == {}, output
    with open(f"{csv_prefix}_failures.csv", newline="") as file:
        errors = {(row["Method"], row["Error"]) for row in csv.DictReader(file)}
    assert {kind for kind, _ in errors} == {"POST", "grpc"}, errors
    # Locust stores the repr of the exception, e.g. GrpcStatusError('UNAUTHENTICATED: ...').
    assert all("'UNAUTHENTICATED: " in error for kind, error in errors if kind == "grpc"), errors
    assert all("'unauthenticated: " in error for kind, error in errors if kind == "POST"), errors


OVER_LIMIT_LOCUSTFILE = ROOT / "tests" / "e2e" / "locust_over_limit.py"
# Ordinary users make at most about 2 calls a second each, so in 8 s each stays far below it.
OVER_LIMIT_RATE = "60/minute"
# p95 of an ordinary call while greedy callers are throttled; generous for a shared 2-core machine.
LATENCY_BUDGET_MS = 1000


@pytest.fixture(scope="module")
def limited_server(environment, tmp_path_factory) -> Iterator[RunningServer]:
    limited = {**environment, "RATE_LIMIT_DEFAULT": OVER_LIMIT_RATE}
    limited["DATABASE_URL"] = environment["DATABASE_URL"].replace("locust.db", "limited.db")
    run_migrations(limited)
    with run_server(limited, tmp_path_factory.mktemp("limited-log") / "server.log") as running:
        yield running


def test_greedy_callers_are_throttled_others_unaffected(limited_server, environment, tmp_path):
    csv_prefix = tmp_path / "locust"

    result = run_locust(
        limited_server, {**environment, "LOCUST_ADMIN_USERS": "0"}, csv_prefix,
        seconds=8, locustfile=OVER_LIMIT_LOCUSTFILE, users=8,
    )
    stats = read_stats(csv_prefix)
    output = f"locust output:\n{result.stdout}\n{result.stderr}\nserver log:\n{limited_server.log()[-3000:]}"

    assert result.returncode == 0, output
    failures = {key: row["Failure Count"] for key, row in stats.items() if row["Failure Count"] != "0"}
    assert failures == {}, output
    throttled = {kind: int(row["Request Count"]) for (kind, name), row in stats.items() if name == "throttled"}
    assert throttled.get("POST", 0) > 0, output
    assert throttled.get("grpc", 0) > 0, output
    ordinary = {key: row for key, row in stats.items() if not key[1].startswith(("greedy", "throttled"))}
    assert ("POST", "/functions.user.v1.UserService/GetMe") in ordinary, output
    assert ("grpc", "/functions.user.v1.UserService/GetMe") in ordinary, output
    slow = {key: row["95%"] for key, row in ordinary.items() if float(row["95%"]) > LATENCY_BUDGET_MS}
    assert slow == {}, output
