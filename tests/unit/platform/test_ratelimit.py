"""Rate limit keys, per-RPC limits and throttled replies, driving the middleware as an ASGI app."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from functions.auth.v1 import auth_pb2
from functions.options.v1 import options_pb2
from functions.user.v1 import user_pb2
from google.rpc import error_details_pb2

from app.platform import ratelimit
from app.platform.context import Principal, principal_var
from app.platform.ratelimit import (
    CallLimiter,
    RateLimitMiddleware,
    caller_key,
    client_ip,
    parse_limits,
    rpc_of,
)
from app.settings import Settings
from tests.servers import free_port

WHO_AM_I = "/functions.auth.v1.AuthService/WhoAmI"
GET_ME = "/functions.user.v1.UserService/GetMe"
CONTRACT_FILES = [auth_pb2.DESCRIPTOR, user_pb2.DESCRIPTOR]


def http_scope(path: str = WHO_AM_I, *, method: str = "POST", client: str = "192.0.2.7", **headers: str) -> dict:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "client": (client, 50000),
        "headers": [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()],
    }


async def reply_ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def call(middleware, scope: dict) -> tuple[int, dict[str, str], bytes]:
    """Send one request through the middleware; return the status, headers and body it sent."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    start = sent[0]
    headers = {key.decode(): value.decode() for key, value in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def middleware(**settings) -> RateLimitMiddleware:
    return RateLimitMiddleware(reply_ok, Settings(**settings))


@pytest.mark.parametrize(
    ("notation", "expected"),
    [
        ("5/minute", ["5 per 1 minute"]),
        ("5/second;100/hour", ["5 per 1 second", "100 per 1 hour"]),
    ],
)
def test_parse_limits_accepts_notation(notation: str, expected: list[str]) -> None:
    assert [str(limit) for limit in parse_limits(notation, "RATE_LIMIT_DEFAULT")] == expected


@pytest.mark.parametrize("notation", ["", "often", "5/fortnight"])
def test_parse_limits_rejects_invalid(notation: str) -> None:
    with pytest.raises(ValueError, match="RATE_LIMIT_DEFAULT must be in the notation"):
        parse_limits(notation, "RATE_LIMIT_DEFAULT")


def test_invalid_default_stops_startup() -> None:
    with pytest.raises(ValueError, match="RATE_LIMIT_DEFAULT"):
        CallLimiter(Settings(rate_limit_default="lots"))


@pytest.mark.parametrize(("service", "method"), [(s.full_name, m.name) for f in CONTRACT_FILES for s in f.services_by_name.values() for m in s.methods])
def test_declared_rate_limits_parse(service: str, method: str) -> None:
    policy = ratelimit.policy_for(service, method)

    if policy.rate_limit:
        parse_limits(policy.rate_limit, f"rate_limit of {service}/{method}")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (GET_ME, ("functions.user.v1.UserService", "GetMe")),
        ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health", "Check")),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo")),
        ("/functions.user.v1.UserService/MadeUp", ("functions.user.v1.UserService", "*")),
        ("/unknown.v1.Service/Call", None),
        ("/healthz", None),
        ("/functions.user.v1.UserService/GetMe/extra", None),
        ("/functions.user.v1.UserService/", None),
    ],
)
def test_rpc_of_path(path: str, expected) -> None:
    assert rpc_of(path) == expected


def test_trusted_fly_header_names_client() -> None:
    scope = http_scope(fly_client_ip="203.0.113.1", x_forwarded_for="198.51.100.9")

    assert client_ip(scope, trust_fly_proxy=True) == "203.0.113.1"


def test_untrusted_fly_header_is_ignored() -> None:
    scope = http_scope(fly_client_ip="203.0.113.1")

    assert client_ip(scope, trust_fly_proxy=False) == "192.0.2.7"


def test_forwarded_for_is_never_read() -> None:
    scope = http_scope(x_forwarded_for="198.51.100.9")

    assert client_ip(scope, trust_fly_proxy=True) == "192.0.2.7"


def test_malformed_fly_header_falls_back_to_peer() -> None:
    scope = http_scope(fly_client_ip="not an address")

    assert client_ip(scope, trust_fly_proxy=True) == "192.0.2.7"


def test_signed_in_caller_keyed_by_uid() -> None:
    token = principal_var.set(Principal(uid="alice"))
    try:
        key = caller_key(http_scope(fly_client_ip="203.0.113.1"), trust_fly_proxy=True)
    finally:
        principal_var.reset(token)

    assert key == "uid:alice"


def test_anonymous_caller_keyed_by_ip() -> None:
    assert caller_key(http_scope(), trust_fly_proxy=False) == "ip:192.0.2.7"


def test_policy_rate_limit_overrides_default(monkeypatch) -> None:
    policy = options_pb2.AccessPolicy(access=options_pb2.ACCESS_SIGNED_IN, rate_limit="2/second;10/minute")
    monkeypatch.setattr(ratelimit, "policy_for", lambda service, method: policy)

    limits = CallLimiter(Settings(rate_limit_default="600/minute")).limits_for("functions.auth.v1.AuthService", "WhoAmI")

    assert [str(limit) for limit in limits.limits] == ["2 per 1 second", "10 per 1 minute"]


def test_empty_policy_rate_limit_uses_default(monkeypatch) -> None:
    policy = options_pb2.AccessPolicy(access=options_pb2.ACCESS_SIGNED_IN)
    monkeypatch.setattr(ratelimit, "policy_for", lambda service, method: policy)

    limits = CallLimiter(Settings(rate_limit_default="7/minute")).limits_for("functions.auth.v1.AuthService", "WhoAmI")

    assert [str(limit) for limit in limits.limits] == ["7 per 1 minute"]


def test_invalid_policy_rate_limit_uses_default(monkeypatch, caplog) -> None:
    policy = options_pb2.AccessPolicy(access=options_pb2.ACCESS_SIGNED_IN, rate_limit="often")
    monkeypatch.setattr(ratelimit, "policy_for", lambda service, method: policy)

    with caplog.at_level(logging.ERROR, logger="app.platform.ratelimit"):
        limits = CallLimiter(Settings(rate_limit_default="7/minute")).limits_for("functions.auth.v1.AuthService", "WhoAmI")

    assert [str(limit) for limit in limits.limits] == ["7 per 1 minute"]
    assert "rate_limit of functions.auth.v1.AuthService/WhoAmI" in caplog.text


async def test_policy_rate_limit_is_enforced(monkeypatch) -> None:
    policy = options_pb2.AccessPolicy(access=options_pb2.ACCESS_SIGNED_IN, rate_limit="1/minute")
    monkeypatch.setattr(ratelimit, "policy_for", lambda service, method: policy)
    limited = middleware(rate_limit_default="600/minute")

    first, _, _ = await call(limited, http_scope())
    second, _, body = await call(limited, http_scope())

    assert first == 200
    assert second == 429
    assert "rate limit 1 per 1 minute exceeded for functions.auth.v1.AuthService/WhoAmI" in json.loads(body)["message"]


async def test_connect_reply_when_limited() -> None:
    limited = middleware(rate_limit_default="2/minute")

    statuses = [(await call(limited, http_scope()))[0] for _ in range(2)]
    status, headers, body = await call(limited, http_scope())
    error = json.loads(body)
    details = {d["type"]: base64.b64decode(d["value"] + "=" * (-len(d["value"]) % 4)) for d in error["details"]}
    retry_info = error_details_pb2.RetryInfo.FromString(details["google.rpc.RetryInfo"])

    assert statuses == [200, 200]
    assert status == 429
    assert error["code"] == "resource_exhausted"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert retry_info.retry_delay.seconds == int(headers["retry-after"])
    assert error["message"].endswith(f"retry in {headers['retry-after']} s")
    assert "192.0.2.7" not in error["message"]


@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc-web+proto"])
async def test_grpc_reply_when_limited(content_type: str) -> None:
    limited = middleware(rate_limit_default="1/minute")

    await call(limited, http_scope(content_type=content_type))
    status, headers, body = await call(limited, http_scope(content_type=content_type))

    assert status == 200
    assert headers["grpc-status"] == "8"
    assert headers["content-type"] == content_type
    assert body == b""


async def test_limit_is_per_method() -> None:
    limited = middleware(rate_limit_default="1/minute")

    await call(limited, http_scope(WHO_AM_I))
    status, _, _ = await call(limited, http_scope(GET_ME))

    assert status == 200


@pytest.mark.parametrize(
    "scope",
    [
        http_scope("/healthz", method="GET"),
        http_scope("/metrics", method="GET"),
        http_scope(WHO_AM_I, method="OPTIONS"),
        http_scope("/unknown.v1.Service/Call"),
    ],
)
async def test_non_rpc_requests_are_not_counted(scope: dict) -> None:
    limited = middleware(rate_limit_default="1/minute")

    statuses = [(await call(limited, scope))[0] for _ in range(3)]

    assert statuses == [200, 200, 200]


async def test_successful_reply_is_unchanged() -> None:
    limited = middleware(rate_limit_default="5/minute")

    status, headers, body = await call(limited, http_scope())

    assert status == 200
    assert headers == {"content-type": "application/json"}
    assert body == b"{}"


async def test_storage_outage_allows_calls(caplog) -> None:
    limited = middleware(rate_limit_default="1/minute", rate_limit_storage_url=f"redis://127.0.0.1:{free_port()}/0")

    with caplog.at_level(logging.WARNING, logger="app.platform.ratelimit"):
        statuses = [(await call(limited, http_scope()))[0] for _ in range(4)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]

    assert statuses == [200, 200, 200, 200]
    assert len(warnings) == 1
    assert "rate limit storage failed" in warnings[0].getMessage()
