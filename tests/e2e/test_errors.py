"""The error matrix through a real server: every error class, with its code, reason and message.

Checked over Connect JSON and native gRPC (the two ends of the protocol range), plus the
protocols where the encoding itself differs.
"""

from __future__ import annotations

import time
import uuid

import grpc
import httpx
import pytest
from functions.user.v1 import user_pb2
from google.protobuf import field_mask_pb2

from tests.e2e.clients import Protocol, RpcError, call
from tests.e2e.conftest import KEY_ID, PROJECT_ID
from tests.support import (
    OMIT,
    firebase_claims,
    public_key_pem,
    rsa_key,
    sign_hs256,
    sign_rs256,
    unsigned_token,
)

USERS = "functions.user.v1.UserService"
MATRIX_PROTOCOLS = [Protocol.CONNECT_JSON, Protocol.GRPC]


@pytest.fixture(params=MATRIX_PROTOCOLS, ids=lambda p: p.value)
def protocol(request) -> Protocol:
    return request.param


def new_uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def bad_tokens(signing_key) -> dict[str, tuple[str, str]]:
    """Return tokens that must be rejected, by name, with the expected rejection reason."""
    now = int(time.time())
    claims = firebase_claims(project_id=PROJECT_ID, uid="mallory", now=now)
    other_key = rsa_key("e2e-other")
    return {
        "expired": (sign_rs256({**claims, "iat": now - 7200, "exp": now - 10}, signing_key, kid=KEY_ID), "TOKEN_EXPIRED"),
        "future iat": (sign_rs256({**claims, "iat": now + 600}, signing_key, kid=KEY_ID), "TOKEN_NOT_YET_VALID"),
        "wrong audience": (sign_rs256({**claims, "aud": "other-project"}, signing_key, kid=KEY_ID), "WRONG_AUDIENCE"),
        "wrong issuer": (
            sign_rs256({**claims, "iss": "https://securetoken.google.com/other"}, signing_key, kid=KEY_ID), "WRONG_ISSUER"
        ),
        "other key": (sign_rs256(claims, other_key, kid=KEY_ID), "BAD_SIGNATURE"),
        "unknown kid": (sign_rs256(claims, signing_key, kid="no-such-key"), "UNKNOWN_KID"),
        "unsigned": (unsigned_token(claims, kid=KEY_ID), "UNSUPPORTED_ALGORITHM"),
        "hs256 with public key": (sign_hs256(claims, public_key_pem(signing_key), kid=KEY_ID), "UNSUPPORTED_ALGORITHM"),
        "garbage": ("not-a-token", "MALFORMED_TOKEN"),
        "missing exp": (sign_rs256(firebase_claims(project_id=PROJECT_ID, exp=OMIT), signing_key, kid=KEY_ID), "MISSING_CLAIM"),
    }


BAD_TOKEN_NAMES = [
    "expired", "future iat", "wrong audience", "wrong issuer", "other key", "unknown kid", "unsigned",
    "hs256 with public key", "garbage", "missing exp",
]


@pytest.mark.parametrize("name", BAD_TOKEN_NAMES)
async def test_bad_token_is_unauthenticated(protocol, server, signing_key, name) -> None:
    token, reason = bad_tokens(signing_key)[name]

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)

    assert raised.value.code == "unauthenticated"
    assert raised.value.reason == reason
    assert token not in raised.value.message


async def test_missing_token_is_unauthenticated(protocol, server) -> None:
    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse)

    assert raised.value.code == "unauthenticated"
    assert raised.value.reason == "MISSING_TOKEN"
    assert "Authorization" in raised.value.message


async def test_non_bearer_authorization_is_unauthenticated(protocol, server) -> None:
    with pytest.raises(RpcError) as raised:
        await call(
            protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse,
            headers={"authorization": "Basic YWxpY2U6c2VjcmV0"},
        )

    assert raised.value.code == "unauthenticated"
    assert raised.value.reason == "MALFORMED_AUTHORIZATION"


async def test_expired_token_message_says_expired(protocol, server, signing_key) -> None:
    token, _ = bad_tokens(signing_key)["expired"]

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)

    assert "expired" in raised.value.message


async def test_iat_within_clock_skew_is_accepted(protocol, server, signing_key) -> None:
    uid = new_uid("skew")
    now = int(time.time())
    token = sign_rs256(firebase_claims(project_id=PROJECT_ID, uid=uid, now=now + 3), signing_key, kid=KEY_ID)

    response = await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)

    assert response.user.uid == uid


async def test_invalid_field_names_field_and_problem(protocol, server, tokens) -> None:
    token = tokens.mint(new_uid("invalid"))
    request = user_pb2.UpdateMeRequest(
        user=user_pb2.User(display_name="x" * 90, photo_url="http://insecure.example/a.png"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "photo_url"]),
    )

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "UpdateMe", request, user_pb2.UpdateMeResponse, token=token)

    violations = raised.value.violations
    assert raised.value.code == "invalid_argument"
    assert "64" in violations["user.display_name"]
    assert "90" in violations["user.display_name"]
    assert "https" in violations["user.photo_url"]
    assert "user.display_name" in raised.value.message


async def test_invalid_update_keeps_stored_profile(protocol, server, tokens) -> None:
    token = tokens.mint(new_uid("keep"), name="Kept")
    request = user_pb2.UpdateMeRequest(
        user=user_pb2.User(display_name="Changed", time_zone="Mars/Olympus"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "time_zone"]),
    )

    with pytest.raises(RpcError):
        await call(protocol, server.address, USERS, "UpdateMe", request, user_pb2.UpdateMeResponse, token=token)
    after = await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)

    assert after.user.display_name == "Kept"


async def test_unknown_mask_path_is_invalid(protocol, server, tokens) -> None:
    request = user_pb2.UpdateMeRequest(update_mask=field_mask_pb2.FieldMask(paths=["email"]))

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "UpdateMe", request, user_pb2.UpdateMeResponse, token=tokens.mint(new_uid("mask")))

    assert raised.value.code == "invalid_argument"
    assert "update_mask.paths" in raised.value.violations


async def test_stale_etag_is_aborted(protocol, server, tokens) -> None:
    token = tokens.mint(new_uid("etag"))
    await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)
    request = user_pb2.UpdateMeRequest(
        user=user_pb2.User(bio="new"), update_mask=field_mask_pb2.FieldMask(paths=["bio"]), etag="stale-etag"
    )

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "UpdateMe", request, user_pb2.UpdateMeResponse, token=token)

    assert raised.value.code == "aborted"


async def test_unknown_user_is_not_found(protocol, server, tokens) -> None:
    missing = new_uid("missing")
    admin = tokens.mint(new_uid("admin"), roles=["admin"])

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "GetUser", user_pb2.GetUserRequest(uid=missing), user_pb2.GetUserResponse, token=admin)

    assert raised.value.code == "not_found"
    assert missing in raised.value.message
    assert raised.value.reason


async def test_bad_page_token_is_invalid(protocol, server, tokens) -> None:
    admin = tokens.mint(new_uid("admin"), roles=["admin"])

    with pytest.raises(RpcError) as raised:
        await call(
            protocol, server.address, USERS, "ListUsers", user_pb2.ListUsersRequest(page_token="forged!"),
            user_pb2.ListUsersResponse, token=admin,
        )

    assert raised.value.code == "invalid_argument"
    assert "page_token" in raised.value.violations


def test_wrong_json_type_names_the_field(server, tokens) -> None:
    admin = tokens.mint(new_uid("admin"), roles=["admin"])

    response = httpx.post(
        f"{server.url}/{USERS}/ListUsers",
        content=b'{"pageSize": "many"}',
        headers={"content-type": "application/json", "authorization": f"Bearer {admin}"},
    )

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
    assert "pageSize" in response.json()["message"]


def test_malformed_json_is_invalid_argument(server, tokens) -> None:
    response = httpx.post(
        f"{server.url}/{USERS}/GetMe",
        content=b'{"unterminated',
        headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint(new_uid('json'))}"},
    )

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"


def test_misspelled_json_field_is_named(server, tokens) -> None:
    """A misspelled field would otherwise read as unset, and the update mask would clear it."""
    response = httpx.post(
        f"{server.url}/{USERS}/UpdateMe",
        content=b'{"updateMask": "displayName", "user": {"display_nam": "A"}}',
        headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint(new_uid('typo'))}"},
    )

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
    assert response.json()["message"] == "user.display_nam is not a field of functions.user.v1.User: check its spelling"


@pytest.mark.parametrize(
    ("path", "headers", "status", "message"),
    [
        (f"/{USERS}/GetMee", {"content-type": "application/json"}, 404, "functions.user.v1.UserService has no method GetMee"),
        (f"/{USERS}/GetMe", {}, 415, "takes content-type application/json or application/proto: got no content-type"),
        (
            "/grpc.health.v1.Health/Watch",
            {"content-type": "application/json"},
            415,
            "takes content-type application/connect+json or application/connect+proto",
        ),
    ],
)
def test_bare_rejections_get_an_error_body(server, tokens, path, headers, status, message) -> None:
    response = httpx.post(
        f"{server.url}{path}", content=b"{}", headers={**headers, "authorization": f"Bearer {tokens.mint(new_uid('bare'))}"}
    )

    assert response.status_code == status
    assert message in response.json()["message"]


def test_delete_of_method_names_the_allowed_methods(server, tokens) -> None:
    response = httpx.delete(f"{server.url}/{USERS}/GetMe", headers={"authorization": f"Bearer {tokens.mint(new_uid('delete'))}"})

    assert response.status_code == 405
    assert response.json()["message"] == f"{USERS}/GetMe must be called with POST or GET: got DELETE"


def test_get_with_side_effects_rejected(server, tokens) -> None:
    response = httpx.get(
        f"{server.url}/{USERS}/UpdateMe?encoding=json&message=%7B%7D", headers={"authorization": f"Bearer {tokens.mint(new_uid('get'))}"}
    )

    assert response.status_code == 405
    assert response.json()["message"].endswith("must be called with POST: only methods without side effects take GET")


def test_oversized_json_body_is_resource_exhausted(server, tokens) -> None:
    body = b'{"user": {"bio": "' + b"x" * (2 * 1024 * 1024) + b'"}}'

    response = httpx.post(
        f"{server.url}/{USERS}/UpdateMe",
        content=body,
        headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint(new_uid('big'))}"},
    )

    assert response.status_code == 429
    assert response.json()["code"] == "resource_exhausted"


def test_oversized_grpc_message_is_resource_exhausted(server, tokens) -> None:
    request = user_pb2.UpdateMeRequest(user=user_pb2.User(bio="x" * (2 * 1024 * 1024)))

    with grpc.insecure_channel(server.address) as channel:
        update_me = channel.unary_unary(
            f"/{USERS}/UpdateMe",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=user_pb2.UpdateMeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as raised:
            update_me(request, metadata=[("authorization", f"Bearer {tokens.mint(new_uid('big'))}")], timeout=10)

    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_method_is_unimplemented_over_grpc(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        missing = channel.unary_unary(f"/{USERS}/DeleteEverything")
        with pytest.raises(grpc.RpcError) as raised:
            missing(b"", timeout=10)

    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


CONTROL_CHARACTER_REQUESTS = [
    pytest.param(
        "UpdateMe",
        user_pb2.UpdateMeRequest(
            user=user_pb2.User(preferences={"a": "x\x00y"}), update_mask=field_mask_pb2.FieldMask(paths=["preferences"])
        ),
        user_pb2.UpdateMeResponse,
        "user.preferences",
        id="nul in preference value",
    ),
    pytest.param(
        "UpdateMe",
        user_pb2.UpdateMeRequest(
            user=user_pb2.User(preferences={"a": "\x1b[31mred"}), update_mask=field_mask_pb2.FieldMask(paths=["preferences"])
        ),
        user_pb2.UpdateMeResponse,
        "user.preferences",
        id="escape in preference value",
    ),
    pytest.param("GetUser", user_pb2.GetUserRequest(uid="a\x00b"), user_pb2.GetUserResponse, "uid", id="nul in uid"),
    pytest.param(
        "ListUsers", user_pb2.ListUsersRequest(email_prefix="\x00"), user_pb2.ListUsersResponse, "email_prefix",
        id="nul in email prefix",
    ),
]


@pytest.mark.parametrize(("method", "request_message", "response_type", "field"), CONTROL_CHARACTER_REQUESTS)
async def test_control_characters_are_invalid(protocol, server, tokens, method, request_message, response_type, field) -> None:
    admin = tokens.mint(new_uid("admin"), roles=["admin"])

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, method, request_message, response_type, token=admin)

    assert raised.value.code == "invalid_argument"
    assert field in raised.value.violations
    assert "control characters" in raised.value.violations[field]


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (b"[]", "request body", "must be a JSON object: got array"),
        (b"null", "request body", "must be a JSON object: got null"),
        (b'{"user": "garbage"}', "user", "must be a JSON object: got string"),
        (b'{"user": 5}', "user", "must be a JSON object: got number"),
        (b'{"updateMask": "bio", "update_mask": "locale"}', "update_mask", "must appear once"),
        (b"[" * 5000, "request body", "must not nest JSON values this deeply"),
        (b'{"user": {"preferences": {"theme": 1}}}', "request body", "preferences"),
    ],
)
def test_wrongly_shaped_json_names_the_field(server, tokens, body, field, problem) -> None:
    uid = new_uid("shape")
    token = tokens.mint(uid, name="Unchanged")
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}

    response = httpx.post(f"{server.url}/{USERS}/UpdateMe", content=body, headers=headers)
    after = httpx.post(f"{server.url}/{USERS}/GetMe", content=b"{}", headers=headers)

    assert response.status_code == 400
    assert response.json()["code"] == "invalid_argument"
    assert response.json()["message"].startswith(field)
    assert problem in response.json()["message"]
    assert "Error" not in response.json()["message"]
    assert after.json()["user"]["displayName"] == "Unchanged"
