"""UserService through a real server, over every protocol, on every database backend."""

from __future__ import annotations

import uuid

import httpx
import pytest
from functions.user.v1 import user_pb2
from google.protobuf import field_mask_pb2

from tests.e2e.clients import ALL_PROTOCOLS, Protocol, RpcError, call

USERS = "functions.user.v1.UserService"


def new_uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=ALL_PROTOCOLS, ids=lambda p: p.value)
def protocol(request) -> Protocol:
    return request.param


async def get_me(protocol, server, token) -> user_pb2.User:
    response = await call(protocol, server.address, USERS, "GetMe", user_pb2.GetMeRequest(), user_pb2.GetMeResponse, token=token)
    return response.user


async def test_get_me_creates_profile_from_token(protocol, server, tokens) -> None:
    uid = new_uid("getme")
    token = tokens.mint(uid, email=f"{uid}@Example.com", name="Ada Lovelace", picture="https://example.com/ada.png")

    first = await get_me(protocol, server, token)
    second = await get_me(protocol, server, token)

    assert first.uid == uid
    assert first.email == f"{uid}@example.com"
    assert first.display_name == "Ada Lovelace"
    assert first.photo_url == "https://example.com/ada.png"
    assert first.etag
    assert first.create_time.seconds > 0
    assert second == first


async def test_update_me_changes_masked_fields_only(protocol, server, tokens) -> None:
    uid = new_uid("update")
    token = tokens.mint(uid, name="Before")
    before = await get_me(protocol, server, token)
    request = user_pb2.UpdateMeRequest(
        user=user_pb2.User(display_name="After", bio="ignored: not in the mask", preferences={"theme": "dark"}),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "preferences"]),
        etag=before.etag,
    )

    updated = (await call(protocol, server.address, USERS, "UpdateMe", request, user_pb2.UpdateMeResponse, token=token)).user
    after = await get_me(protocol, server, token)

    assert updated.display_name == "After"
    assert updated.bio == ""
    assert dict(updated.preferences) == {"theme": "dark"}
    assert updated.etag != before.etag
    # The related preferences rows load in a fresh unit of work after the commit as well.
    assert after == updated


async def test_get_user_self_and_admin(protocol, server, tokens) -> None:
    uid = new_uid("target")
    await get_me(protocol, server, tokens.mint(uid))
    admin = tokens.mint(new_uid("admin"), roles=["admin"])

    by_self = await call(protocol, server.address, USERS, "GetUser", user_pb2.GetUserRequest(uid=uid), user_pb2.GetUserResponse, token=tokens.mint(uid))
    by_admin = await call(protocol, server.address, USERS, "GetUser", user_pb2.GetUserRequest(uid=uid), user_pb2.GetUserResponse, token=admin)

    assert by_self.user.uid == uid
    assert by_admin.user == by_self.user


async def test_get_user_of_someone_else_is_denied(protocol, server, tokens) -> None:
    owner = new_uid("owner")
    await get_me(protocol, server, tokens.mint(owner))

    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "GetUser", user_pb2.GetUserRequest(uid=owner), user_pb2.GetUserResponse, token=tokens.mint(new_uid("other")))

    assert raised.value.code == "permission_denied"
    assert owner not in raised.value.message


async def test_list_users_pages_and_filters(protocol, server, tokens) -> None:
    prefix = f"list{uuid.uuid4().hex[:6]}"
    uids = sorted(f"{prefix}-{n}" for n in range(5))
    for uid in uids:
        await get_me(protocol, server, tokens.mint(uid, email=f"{uid}@example.com"))
    admin = tokens.mint(new_uid("admin"), roles=["admin"])

    seen, page_token = [], ""
    while True:
        request = user_pb2.ListUsersRequest(page_size=2, page_token=page_token, email_prefix=prefix.upper())
        page = await call(protocol, server.address, USERS, "ListUsers", request, user_pb2.ListUsersResponse, token=admin)
        assert len(page.users) <= 2
        seen += [u.uid for u in page.users]
        page_token = page.next_page_token
        if not page_token:
            break

    assert seen == uids


async def test_list_users_needs_admin(protocol, server, tokens) -> None:
    with pytest.raises(RpcError) as raised:
        await call(protocol, server.address, USERS, "ListUsers", user_pb2.ListUsersRequest(), user_pb2.ListUsersResponse, token=tokens.mint(new_uid("plain")))

    assert raised.value.code == "permission_denied"
    assert raised.value.reason == "MISSING_ROLE"


def test_get_me_over_connect_get(server, tokens) -> None:
    uid = new_uid("get")

    response = httpx.get(
        f"{server.url}/{USERS}/GetMe",
        params={"encoding": "json", "message": "{}"},
        headers={"authorization": f"Bearer {tokens.mint(uid)}"},
    )

    assert response.status_code == 200
    assert response.json()["user"]["uid"] == uid


def test_json_reply_is_compact(server, tokens) -> None:
    response = httpx.post(
        f"{server.url}/{USERS}/GetMe",
        content=b"{}",
        headers={"content-type": "application/json", "authorization": f"Bearer {tokens.mint(new_uid('compact'))}"},
    )

    assert response.status_code == 200
    assert b"\n" not in response.content
    assert b'": ' not in response.content


def test_grpc_web_text_round_trip(server, tokens) -> None:
    import base64

    uid = new_uid("webtext")
    response = httpx.post(
        f"{server.url}/{USERS}/GetMe",
        content=base64.b64encode(b"\x00\x00\x00\x00\x00"),
        headers={
            "content-type": "application/grpc-web-text",
            "x-grpc-web": "1",
            "authorization": f"Bearer {tokens.mint(uid)}",
        },
    )

    frames = base64.b64decode(response.content)
    length = int.from_bytes(frames[1:5], "big")
    message = user_pb2.GetMeResponse.FromString(frames[5 : 5 + length])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/grpc-web-text")
    assert message.user.uid == uid
    assert b"grpc-status:0" in frames[5 + length :].replace(b" ", b"")


def test_get_user_over_connect_get_binary(server, tokens) -> None:
    import base64

    uid = new_uid("getbin")
    token = tokens.mint(uid)
    message = base64.urlsafe_b64encode(user_pb2.GetUserRequest(uid=uid).SerializeToString()).rstrip(b"=").decode()

    response = httpx.get(
        f"{server.url}/{USERS}/GetUser",
        params={"encoding": "proto", "base64": "1", "message": message},
        headers={"authorization": f"Bearer {token}"},
    )
    first_call = httpx.post(
        f"{server.url}/{USERS}/GetMe", content=b"{}",
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
    )
    again = httpx.get(
        f"{server.url}/{USERS}/GetUser",
        params={"encoding": "proto", "base64": "1", "message": message},
        headers={"authorization": f"Bearer {token}"},
    )

    assert response.status_code == 404
    assert first_call.status_code == 200
    assert again.status_code == 200
    assert again.headers["content-type"] == "application/proto"
    assert user_pb2.GetUserResponse.FromString(again.content).user.uid == uid


def test_get_on_method_with_side_effects_is_rejected(server, tokens) -> None:
    response = httpx.get(
        f"{server.url}/{USERS}/UpdateMe",
        params={"encoding": "json", "message": "{}"},
        headers={"authorization": f"Bearer {tokens.mint(new_uid('getupdate'))}"},
    )

    assert response.status_code == 405


def test_access_log_reports_code_of_grpc_web_text(server, tokens) -> None:
    import base64
    import time

    request_id = f"webtext-{uuid.uuid4().hex}"
    httpx.post(
        f"{server.url}/{USERS}/GetUser",
        content=base64.b64encode(b"\x00\x00\x00\x00\x00"),
        headers={
            "content-type": "application/grpc-web-text",
            "x-grpc-web": "1",
            "x-request-id": request_id,
            "authorization": f"Bearer {tokens.mint(new_uid('webtext-log'))}",
        },
    )

    deadline = time.monotonic() + 5
    while request_id not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log().splitlines() if request_id in line and "app.access" in line)
    assert "GetUser not_found" in line
