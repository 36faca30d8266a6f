"""DeleteMe against real SQLite and Postgres databases: the tombstone, its event and who it locks out.

The databases are shared by the tests of a session, so each test uses its own uids and email prefixes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from functions.events.v1 import events_pb2
from functions.user.v1 import user_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import func, select

from app.platform.context import Principal, principal_var
from app.platform.db import Database
from app.platform.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from app.platform.events import OutboxEventRow
from app.users import logic
from app.users.handler import UserHandler
from app.users.model import UserPreferenceRow, UserProfile, UserRow

DELETE_TIME = datetime(2026, 6, 1, 8, 30, 0, 250000, tzinfo=UTC)


def new_principal(**claims: object) -> Principal:
    uid = f"delete-{secrets.token_hex(6)}"
    return Principal(uid=uid, email=f"{uid}@example.com", claims=claims)


@contextmanager
def signed_in(principal: Principal) -> Iterator[None]:
    token = principal_var.set(principal)
    try:
        yield
    finally:
        principal_var.reset(token)


class FakeFirebase:
    """Records disable_user calls and raises `failures` errors first."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.disabled: list[str] = []

    async def disable_user(self, uid: str) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.disabled.append(uid)


async def create_profile(database: Database, principal: Principal, **values: object) -> UserProfile:
    async with database.unit_of_work() as session:
        profile = await logic.get_or_create_profile(session, principal)
        if not values:
            return profile
        return await logic.update_profile(session, principal, values, list(values))


async def delete(database: Database, principal: Principal, etag: str = "", now: datetime = DELETE_TIME) -> UserProfile:
    async with database.unit_of_work() as session:
        return await logic.delete_profile(session, principal, etag, now=now)


async def load_row(database: Database, uid: str) -> UserRow | None:
    async with database.unit_of_work() as session:
        return await session.get(UserRow, uid, populate_existing=True)


async def count_preferences(database: Database, uid: str) -> int:
    async with database.unit_of_work() as session:
        statement = select(func.count()).select_from(UserPreferenceRow).where(UserPreferenceRow.uid == uid)
        return await session.scalar(statement)


async def deleted_events(database: Database, uid: str) -> list[events_pb2.UserDeleted]:
    async with database.unit_of_work() as session:
        statement = select(OutboxEventRow.payload).where(OutboxEventRow.type == "functions.events.v1.UserDeleted")
        payloads = (await session.execute(statement)).scalars().all()
    messages = [events_pb2.UserDeleted.FromString(payload) for payload in payloads]
    return [message for message in messages if message.uid == uid]


async def test_delete_clears_personal_fields(database: Database) -> None:
    principal = new_principal(name="Ada", picture="https://example.com/ada.png")
    before = await create_profile(
        database, principal, bio="likes engines", locale="en", time_zone="Europe/London", preferences={"theme": "dark"}
    )

    deleted = await delete(database, principal)
    row = await load_row(database, principal.uid)

    assert deleted.delete_time == DELETE_TIME
    assert deleted.version == before.version + 1
    assert row is not None
    assert row.delete_time == DELETE_TIME
    assert row.email == ""
    assert row.display_name == ""
    assert row.photo_url == ""
    assert row.bio == ""
    assert row.locale == ""
    assert row.time_zone == ""
    assert row.create_time == before.create_time
    assert await count_preferences(database, principal.uid) == 0


async def test_delete_records_user_deleted_once(database: Database) -> None:
    principal = new_principal()
    await create_profile(database, principal)

    await delete(database, principal)
    await delete(database, principal)

    assert await deleted_events(database, principal.uid) == [events_pb2.UserDeleted(uid=principal.uid)]


async def test_repeated_delete_returns_first_delete_time(database: Database) -> None:
    principal = new_principal()
    profile = await create_profile(database, principal)

    first = await delete(database, principal, profile.etag)
    # A retry sends the same request: the etag read before the deletion.
    second = await delete(database, principal, profile.etag, now=DELETE_TIME.replace(year=2027))

    assert second.delete_time == first.delete_time
    assert second.version == first.version


async def test_delete_with_stale_etag_is_aborted(database: Database) -> None:
    principal = new_principal()
    stale = await create_profile(database, principal)
    await create_profile(database, principal, bio="changed")

    with pytest.raises(Aborted) as raised:
        await delete(database, principal, stale.etag)

    row = await load_row(database, principal.uid)
    assert stale.etag in raised.value.message
    assert row is not None
    assert row.delete_time is None
    assert row.bio == "changed"
    assert await deleted_events(database, principal.uid) == []


async def test_delete_without_profile_leaves_tombstone(database: Database) -> None:
    principal = new_principal()

    deleted = await delete(database, principal)

    row = await load_row(database, principal.uid)
    assert deleted.delete_time == DELETE_TIME
    assert row is not None
    assert row.email == ""
    assert len(await deleted_events(database, principal.uid)) == 1


async def test_concurrent_deletes_agree_on_delete_time(database: Database) -> None:
    principal = new_principal()
    await create_profile(database, principal)

    async def delete_at(second: int) -> UserProfile:
        return await delete(database, principal, now=DELETE_TIME.replace(second=second))

    results = await asyncio.gather(*(delete_at(second) for second in range(4)))

    assert len({result.delete_time for result in results}) == 1
    assert len(await deleted_events(database, principal.uid)) == 1


async def test_get_me_after_delete_is_unauthenticated(database: Database) -> None:
    principal = new_principal()
    await create_profile(database, principal)
    await delete(database, principal)

    with pytest.raises(Unauthenticated) as raised:
        async with database.unit_of_work() as session:
            await logic.get_or_create_profile(session, principal)

    row = await load_row(database, principal.uid)
    assert raised.value.reason == "ACCOUNT_DELETED"
    assert row is not None
    assert row.delete_time == DELETE_TIME
    assert row.email == ""


async def test_update_me_after_delete_is_unauthenticated(database: Database) -> None:
    principal = new_principal()
    await create_profile(database, principal)
    await delete(database, principal)

    with pytest.raises(Unauthenticated) as raised:
        async with database.unit_of_work() as session:
            await logic.update_profile(session, principal, {"bio": "back"}, ["bio"])

    row = await load_row(database, principal.uid)
    assert raised.value.reason == "ACCOUNT_DELETED"
    assert row is not None
    assert row.bio == ""


async def test_get_user_of_own_deleted_profile_is_unauthenticated(database: Database) -> None:
    principal = new_principal()
    await create_profile(database, principal)
    await delete(database, principal)

    with pytest.raises(Unauthenticated) as raised:
        async with database.unit_of_work() as session:
            await logic.get_profile(session, principal.uid, caller=principal)

    assert raised.value.reason == "ACCOUNT_DELETED"


async def test_deleted_profile_is_not_found_for_admin(database: Database) -> None:
    principal = new_principal()
    await create_profile(database, principal)
    await delete(database, principal)
    admin = Principal(uid="delete-admin", roles=("admin",))

    with pytest.raises(NotFound) as raised:
        async with database.unit_of_work() as session:
            await logic.get_profile(session, principal.uid, caller=admin)

    assert raised.value.message == f"user {principal.uid} not found"


async def test_deleted_admin_is_unauthenticated(database: Database) -> None:
    admin = new_principal()
    await create_profile(database, admin)
    await delete(database, admin)
    other = new_principal()
    await create_profile(database, other)

    with pytest.raises(Unauthenticated) as get_raised:
        async with database.unit_of_work() as session:
            await logic.get_profile(session, other.uid, caller=admin)
    with pytest.raises(Unauthenticated) as list_raised:
        async with database.unit_of_work() as session:
            await logic.list_profiles(session, 0, "", "", caller=admin)

    assert get_raised.value.reason == "ACCOUNT_DELETED"
    assert list_raised.value.reason == "ACCOUNT_DELETED"


async def test_list_users_skips_deleted_profiles(database: Database) -> None:
    tag = f"list-deleted-{secrets.token_hex(4)}"
    principals = [Principal(uid=f"{tag}-{index}", email=f"{tag}-{index}@example.com") for index in range(3)]
    for principal in principals:
        await create_profile(database, principal)
    await delete(database, principals[1])

    async with database.unit_of_work() as session:
        page = await logic.list_profiles(session, 0, "", tag)

    assert [profile.uid for profile in page.profiles] == [principals[0].uid, principals[2].uid]


async def test_handler_disables_firebase_user_after_commit(database: Database) -> None:
    firebase = FakeFirebase()
    handler = UserHandler(database, firebase)
    principal = new_principal()

    with signed_in(principal):
        reply = await handler.delete_me(user_pb2.DeleteMeRequest(), None)

    row = await load_row(database, principal.uid)
    assert reply.uid == principal.uid
    assert row is not None
    assert reply.delete_time.ToDatetime(tzinfo=UTC) == row.delete_time
    assert firebase.disabled == [principal.uid]


async def test_firebase_failure_keeps_deletion_and_retry_finishes(database: Database) -> None:
    firebase = FakeFirebase(Unavailable("Firebase Auth is unavailable; retry later", reason="FIREBASE_UNAVAILABLE"))
    handler = UserHandler(database, firebase)
    principal = new_principal()

    with signed_in(principal), pytest.raises(Unavailable) as raised:
        await handler.delete_me(user_pb2.DeleteMeRequest(), None)
    deleted_row = await load_row(database, principal.uid)
    with signed_in(principal):
        reply = await handler.delete_me(user_pb2.DeleteMeRequest(), None)

    assert raised.value.reason == "FIREBASE_UNAVAILABLE"
    assert f"user {principal.uid} is deleted" in raised.value.message
    assert deleted_row is not None
    assert deleted_row.delete_time is not None
    assert reply.delete_time.ToDatetime(tzinfo=UTC) == deleted_row.delete_time
    assert firebase.disabled == [principal.uid]
    assert len(await deleted_events(database, principal.uid)) == 1


async def test_firebase_without_user_counts_as_disabled(database: Database) -> None:
    firebase = FakeFirebase(NotFound("user not found", reason="USER_NOT_FOUND"))
    handler = UserHandler(database, firebase)
    principal = new_principal()

    with signed_in(principal):
        reply = await handler.delete_me(user_pb2.DeleteMeRequest(), None)

    assert reply.uid == principal.uid


async def test_handler_without_firebase_deletes_then_fails(database: Database) -> None:
    handler = UserHandler(database)
    principal = new_principal()

    with signed_in(principal), pytest.raises(FailedPrecondition) as raised:
        await handler.delete_me(user_pb2.DeleteMeRequest(), None)

    row = await load_row(database, principal.uid)
    assert raised.value.reason == "FIREBASE_NOT_CONFIGURED"
    assert row is not None
    assert row.delete_time is not None


async def test_update_racing_delete_does_not_restore_fields(database: Database) -> None:
    principal = new_principal()
    await create_profile(database, principal)
    request = user_pb2.UpdateMeRequest(user=user_pb2.User(bio="late"), update_mask=FieldMask(paths=["bio"]))
    handler = UserHandler(database, FakeFirebase())

    async def update() -> object:
        with signed_in(principal):
            return await handler.update_me(request, None)

    async def delete_me() -> object:
        with signed_in(principal):
            return await handler.delete_me(user_pb2.DeleteMeRequest(), None)

    await asyncio.gather(update(), delete_me(), return_exceptions=True)

    row = await load_row(database, principal.uid)
    assert row is not None
    assert row.delete_time is not None
    assert row.bio == ""
