"""Faults that services of this kind shipped: compression bombs, browser CORS and gRPC-Web
errors, and a certificate endpoint that is down."""

from __future__ import annotations

import asyncio
import gzip
import time
import urllib.parse
import uuid
from pathlib import Path

import httpx
import pytest
from functions.user.v1 import user_pb2

from tests.e2e.conftest import ALLOWED_ORIGIN, KEY_ID, PROJECT_ID, server_env
from tests.servers import run_migrations, run_server
from tests.support import CertificateServer, certs_document, firebase_claims, sign_rs256

USERS = "functions.user.v1.UserService"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("VmHWM missing from /proc status")


def gzip_bomb(inflated_mib: int) -> bytes:
    """Return gzip-compressed JSON that inflates to about inflated_mib MiB."""
    return gzip.compress(b'{"user":{"bio":"' + b" " * (inflated_mib * 1024 * 1024) + b'"}}', compresslevel=9)


def test_gzip_bomb_is_resource_exhausted(server, tokens) -> None:
    bomb = gzip_bomb(8)
    headers = {"content-type": "application/json", "content-encoding": "gzip", "authorization": f"Bearer {tokens.mint('bomb')}"}

    reply = httpx.post(f"{server.url}/{USERS}/UpdateMe", content=bomb, headers=headers)

    assert len(bomb) < 16 * 1024
    assert reply.status_code == 429
    assert reply.json()["code"] == "resource_exhausted"


def test_gzip_bomb_is_never_inflated_whole(server, tokens) -> None:
    bomb = gzip_bomb(64)
    headers = {"content-type": "application/json", "content-encoding": "gzip", "authorization": f"Bearer {tokens.mint('bomb')}"}
    httpx.post(f"{server.url}/{USERS}/UpdateMe", content=bomb, headers=headers)
    before = peak_rss_kib(server.process.pid)

    replies = [httpx.post(f"{server.url}/{USERS}/UpdateMe", content=bomb, headers=headers) for _ in range(5)]

    assert {reply.json()["code"] for reply in replies} == {"resource_exhausted"}
    # Inflating stops at the 1 MiB message limit; one whole 64 MiB payload would raise the peak
    # by 64 MiB. (A few MiB of growth is the allocator keeping freed buffers.)
    assert peak_rss_kib(server.process.pid) - before < 16 * 1024


def test_unsupported_encoding_names_supported_ones(server, tokens) -> None:
    reply = httpx.post(
        f"{server.url}/{USERS}/GetMe",
        content=b"\x00\x01\x02",
        headers={"content-type": "application/json", "content-encoding": "snappy", "authorization": f"Bearer {tokens.mint('snappy')}"},
    )

    assert reply.status_code == 501
    assert reply.json()["code"] == "unimplemented"
    assert "snappy" in reply.json()["message"]
    assert "gzip" in reply.json()["message"]


def test_cors_preflight_answers_before_auth(server) -> None:
    requested = "authorization,content-type,connect-protocol-version,connect-timeout-ms"

    reply = httpx.options(
        f"{server.url}/{USERS}/GetMe",
        headers={
            "origin": ALLOWED_ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": requested,
        },
    )

    allowed = {h.strip() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert reply.status_code == 204
    assert reply.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "Origin" in reply.headers["vary"]
    assert set(requested.split(",")) <= allowed
    assert {"grpc-timeout", "x-grpc-web", "x-user-agent", "connect-accept-encoding"} <= allowed
    assert "POST" in reply.headers["access-control-allow-methods"]


def test_cors_preflight_allows_signed_url_uploads(server) -> None:
    reply = httpx.options(
        f"{server.url}/storage/v1/local/some-user/some-file",
        headers={"origin": ALLOWED_ORIGIN, "access-control-request-method": "PUT", "access-control-request-headers": "content-type,range"},
    )

    assert reply.status_code == 204
    assert "PUT" in reply.headers["access-control-allow-methods"]
    assert {"content-type", "range"} <= {h.strip() for h in reply.headers["access-control-allow-headers"].split(",")}


def test_cors_preflight_from_unknown_origin_gets_no_grant(server) -> None:
    reply = httpx.options(
        f"{server.url}/{USERS}/GetMe",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )

    assert "access-control-allow-origin" not in reply.headers


def test_cors_reply_exposes_grpc_headers(server, tokens) -> None:
    reply = httpx.post(
        f"{server.url}/{USERS}/GetMe",
        content=b"{}",
        headers={"content-type": "application/json", "origin": ALLOWED_ORIGIN, "authorization": f"Bearer {tokens.mint('cors')}"},
    )

    exposed = {h.strip() for h in reply.headers["access-control-expose-headers"].split(",")}
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin", "x-request-id"} <= exposed


def test_grpc_web_error_is_readable_by_browser(server, tokens) -> None:
    uid = f"never-seen-{uuid.uuid4().hex[:8]}"

    reply = httpx.post(
        f"{server.url}/{USERS}/GetUser",
        content=b"\x00\x00\x00\x00\x00",
        headers={
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "origin": ALLOWED_ORIGIN,
            "authorization": f"Bearer {tokens.mint(uid)}",
        },
    )

    status = grpc_web_status(reply)
    exposed = {h.strip() for h in reply.headers["access-control-expose-headers"].split(",")}
    assert reply.status_code == 200
    assert status["grpc-status"] == "5"
    assert urllib.parse.unquote(status["grpc-message"]) == f"user {uid} not found"
    assert {"grpc-status", "grpc-message"} <= exposed


def grpc_web_status(reply: httpx.Response) -> dict[str, str]:
    """Return the gRPC status of a gRPC-Web reply: from the headers of a trailers-only reply,
    else from the trailer frame (flag 0x80) at the end of the body."""
    if "grpc-status" in reply.headers:
        return {key: reply.headers.get(key, "") for key in ("grpc-status", "grpc-message")}
    body, status = reply.content, {}
    while body:
        flag, length = body[0], int.from_bytes(body[1:5], "big")
        frame, body = body[5 : 5 + length], body[5 + length :]
        if flag & 0x80:
            for line in frame.decode().split("\r\n"):
                key, _, value = line.partition(":")
                if key:
                    status[key.strip().lower()] = value.strip()
    return status


def test_connect_and_grpc_web_share_port_with_grpc(server, tokens) -> None:
    import grpc

    token = tokens.mint(f"shared-{uuid.uuid4().hex[:8]}")
    with grpc.insecure_channel(server.address) as channel:
        get_me = channel.unary_unary(
            f"/{USERS}/GetMe",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=user_pb2.GetMeResponse.FromString,
        )
        over_grpc, call = get_me.with_call(user_pb2.GetMeRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10)

    over_http1 = httpx.post(
        f"{server.url}/{USERS}/GetMe", content=b"{}",
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
    )

    assert dict(call.trailing_metadata()).get("grpc-status", "0") == "0" or call.code() == grpc.StatusCode.OK
    assert over_http1.http_version == "HTTP/1.1"
    assert over_http1.json()["user"]["uid"] == over_grpc.user.uid


@pytest.fixture
def outage_server(tmp_path, signing_key):
    """A server whose certificate endpoint replies only after 5 s, past its 1 s timeout."""
    with CertificateServer(certs_document({KEY_ID: signing_key}), max_age=3600) as certificates:
        certificates.delay_seconds = 5.0
        env = server_env(
            certificates,
            f"sqlite+aiosqlite:///{tmp_path / 'outage.db'}",
            AUTH_CERTS_TIMEOUT_SECONDS="1",
            DEV_KEYS_DIR=str(tmp_path / "dev-keys"),
        )
        run_migrations(env)
        with run_server(env, tmp_path / "server.log") as running:
            yield running, certificates


async def test_certificate_outage_fails_fast_and_recovers(outage_server, signing_key) -> None:
    server, certificates = outage_server
    token = sign_rs256(firebase_claims(project_id=PROJECT_ID, uid="outage"), signing_key, kid=KEY_ID)
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        started = time.monotonic()
        calls = [client.post(f"/{USERS}/GetMe", content=b"{}", headers=headers) for _ in range(20)]
        health = asyncio.create_task(client.get("/healthz"))
        health_reply = await health
        health_seconds = time.monotonic() - started
        replies = await asyncio.gather(*calls)
        calls_seconds = time.monotonic() - started

        assert health_reply.status_code == 200
        assert health_seconds < 0.5
        assert [r.json()["code"] for r in replies] == ["unavailable"] * 20
        assert calls_seconds < 4.0

        certificates.delay_seconds = 0.0
        await asyncio.sleep(1.5)
        recovered = await client.post(f"/{USERS}/GetMe", content=b"{}", headers=headers)

    assert recovered.status_code == 200
    assert recovered.json()["user"]["uid"] == "outage"


def raw_request(server, request: bytes) -> bytes:
    """Send bytes over a plain socket and return the reply, for requests httpx refuses to build."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [(b"application/json", b'"code":"invalid_argument"'), (b"application/grpc-web+proto", b"grpc-status: 3")],
)
def test_non_utf8_header_is_invalid_argument(server, content_type, expected) -> None:
    reply = raw_request(
        server,
        b"POST /functions.user.v1.UserService/GetMe HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"content-type: " + content_type + b"\r\nx-odd: \xe9\r\ncontent-length: 2\r\n\r\n{}",
    )

    assert expected in reply
    assert b"x-odd" in reply
    assert b"codec" not in reply


def test_rpc_replies_are_not_cacheable(server, tokens) -> None:
    reply = httpx.get(
        f"{server.url}/{USERS}/GetMe",
        params={"encoding": "json", "message": "{}"},
        headers={"authorization": f"Bearer {tokens.mint('cache')}"},
    )

    assert reply.status_code == 200
    assert "no-store" in reply.headers["cache-control"]
    assert "private" in reply.headers["cache-control"]


def test_service_path_without_slash_is_not_redirected(server) -> None:
    reply = httpx.post(f"{server.url}/{USERS}", content=b"{}", headers={"host": "evil.example", "content-type": "application/json"})

    assert reply.status_code != 307
    assert "location" not in reply.headers


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [("client-req-0001", True), ("a" * 8, True), ("short", False), ("bad id\r\nx: y", False), ("x" * 200, False)],
)
def test_request_id_is_kept_when_valid(server, incoming, kept) -> None:
    reply = httpx.post(
        f"{server.url}/{USERS}/GetMe", content=b"{}",
        headers={"content-type": "application/json", "x-request-id": incoming.replace("\r\n", " ")},
    )

    request_id = reply.headers["x-request-id"]
    assert (request_id == incoming) is kept
    assert 8 <= len(request_id) <= 128


def test_error_details_carry_request_id(server) -> None:
    import base64

    from google.rpc import error_details_pb2

    reply = httpx.post(
        f"{server.url}/{USERS}/GetMe", content=b"{}",
        headers={"content-type": "application/json", "x-request-id": "trace-me-12345"},
    )

    details = {d["type"]: d["value"] for d in reply.json()["details"]}
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(details["google.rpc.ErrorInfo"] + "=="))
    assert reply.status_code == 401
    assert info.metadata["request_id"] == "trace-me-12345"
    assert info.reason == "MISSING_TOKEN"


def test_two_authorization_headers_are_rejected(server, tokens) -> None:
    token = tokens.mint("two-headers")
    reply = raw_request(
        server,
        b"POST /functions.user.v1.UserService/GetMe HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"content-type: application/json\r\n"
        b"authorization: Bearer " + token.encode() + b"\r\n"
        b"authorization: Bearer " + token.encode() + b"\r\ncontent-length: 2\r\n\r\n{}",
    )

    assert b" 401 " in reply.split(b"\r\n", 1)[0]
    assert b"send one Authorization header" in reply
