"""Probes and tools that need no local protos: /healthz, /readyz, gRPC health, server reflection."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.platform.db import head_revision
from tests.e2e.conftest import server_env
from tests.servers import ROOT, run_migrations, run_server

BUF = ROOT / "node_modules" / ".bin" / "buf"
needs_buf = pytest.mark.skipif(not BUF.exists(), reason="node_modules/.bin/buf is missing: run `make install`")


def test_http_probes(server) -> None:
    healthz = httpx.get(f"{server.url}/healthz")
    readyz = httpx.get(f"{server.url}/readyz")

    assert healthz.json() == {"status": "ok"}
    assert readyz.status_code == 200
    assert readyz.json()["status"] == "ready"


@pytest.mark.parametrize("service", ["", "functions.user.v1.UserService", "functions.auth.v1.AuthService"])
def test_grpc_health_check_serving(server, service) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)

    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_health_unknown_service_not_found(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"), timeout=10)

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def buf_curl(server, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *arguments],
        capture_output=True, text=True, timeout=60, cwd=Path("/"),
    )


@needs_buf
def test_reflection_lists_every_service(server) -> None:
    result = buf_curl(server, "--list-methods", server.url)

    methods = set(result.stdout.split())
    assert result.returncode == 0, result.stderr
    assert "functions.user.v1.UserService/GetMe" in methods
    assert "functions.auth.v1.AuthService/WhoAmI" in methods
    assert "grpc.health.v1.Health/Check" in methods


@needs_buf
def test_buf_curl_calls_get_me_through_reflection(server, tokens) -> None:
    result = buf_curl(
        server, "-H", f"authorization: Bearer {tokens.mint('buf-user')}", "--data", "{}",
        f"{server.url}/functions.user.v1.UserService/GetMe",
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user"]["uid"] == "buf-user"


def test_readyz_waits_for_migrations(tmp_path, cert_server) -> None:
    database = tmp_path / "unmigrated.db"
    env = server_env(cert_server, f"sqlite+aiosqlite:///{database}", DEV_KEYS_DIR=str(tmp_path / "keys"))

    def set_revision(revision: str) -> httpx.Response:
        with sqlite3.connect(database) as connection:
            connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))
        return httpx.get(f"{server.url}/readyz")

    with run_server(env, tmp_path / "server.log") as server:
        before = httpx.get(f"{server.url}/readyz")
        run_migrations(env)
        after = httpx.get(f"{server.url}/readyz")
        behind = set_revision("0001")
        # A release that migrated ahead during a rolling deploy: older code keeps serving.
        ahead = set_revision("9999_from_a_newer_release")
        log = server.log()

    head = head_revision()
    assert before.status_code == 503
    assert before.json()["reason"] == f"database schema at revision None, expected {head}"
    assert after.status_code == 200
    assert behind.status_code == 503
    assert behind.json()["reason"] == f"database schema at revision 0001, expected {head}"
    assert ahead.status_code == 200
    assert "run `python -m app migrate`" in log
