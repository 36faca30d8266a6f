"""The users store and use cases against real SQLite and Postgres databases."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from functions.user.v1 import user_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import delete, func, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import selectinload

from app.platform.context import Principal, principal_var
from app.platform.db import Database
from app.platform.errors import Aborted, NotFound
from app.users import logic, store
from app.users.handler import UserHandler
from app.users.model import UserPreferenceRow, UserProfile, UserRow
from tests.integration.factories import new_profile


def new_uid() -> str:
    return f"user-{secrets.token_hex(6)}"


@contextmanager
def signed_in(principal: Principal) -> Iterator[None]:
    token = principal_var.set(principal)
    try:
        yield
    finally:
        principal_var.reset(token)


async def count_users(database: Database, uid: str) -> int:
    async with database.unit_of_work() as session:
        return await session.scalar(select(func.count()).select_from(UserRow).where(UserRow.uid == uid))


async def test_added_user_reads_back(database: Database) -> None:
    uid = new_uid()
    profile = new_profile(uid, preferences={"theme": "dark", "lang.fallback": "en"})

    async with database.unit_of_work() as session:
        inserted = await store.add_user(session, profile)
    async with database.unit_of_work() as session:
        stored = await store.get_user(session, uid)

    assert inserted is True
    assert stored == profile
    assert stored.create_time.tzinfo is UTC


async def test_add_user_keeps_existing_row(database: Database) -> None:
    uid = new_uid()
    async with database.unit_of_work() as session:
        await store.add_user(session, new_profile(uid, display_name="First"))

    async with database.unit_of_work() as session:
        inserted = await store.add_user(session, new_profile(uid, display_name="Second"))
        stored = await store.get_user(session, uid)

    assert inserted is False
    assert stored.display_name == "First"


async def test_find_user_returns_none_for_unknown_uid(database: Database) -> None:
    async with database.unit_of_work() as session:
        found = await store.find_user(session, new_uid())

    assert found is None


async def test_get_user_raises_not_found(database: Database) -> None:
    uid = new_uid()

    with pytest.raises(NotFound) as caught:
        async with database.unit_of_work() as session:
            await store.get_user(session, uid)

    assert caught.value.message == f"user {uid} not found"


async def test_list_users_pages_by_uid(database: Database) -> None:
    prefix = f"page-{secrets.token_hex(4)}"
    uids = sorted(f"{prefix}-{index}" for index in range(5))
    async with database.unit_of_work() as session:
        for uid in reversed(uids):
            await store.add_user(session, new_profile(uid, email=f"{uid}@example.com"))

    async with database.unit_of_work() as session:
        first = await store.list_users(session, limit=2, email_prefix=prefix)
        second = await store.list_users(session, limit=2, after_uid=first[-1].uid, email_prefix=prefix)
        last = await store.list_users(session, limit=2, after_uid=second[-1].uid, email_prefix=prefix)

    assert [profile.uid for profile in first] == uids[:2]
    assert [profile.uid for profile in second] == uids[2:4]
    assert [profile.uid for profile in last] == uids[4:]


async def test_email_prefix_treats_wildcards_literally(database: Database) -> None:
    tag = secrets.token_hex(4)
    literal = new_profile(new_uid(), email=f"{tag}_a@example.com")
    wildcard_match = new_profile(new_uid(), email=f"{tag}xa@example.com")
    async with database.unit_of_work() as session:
        await store.add_user(session, literal)
        await store.add_user(session, wildcard_match)

    async with database.unit_of_work() as session:
        underscore = await store.list_users(session, limit=10, email_prefix=f"{tag}_")
        percent = await store.list_users(session, limit=10, email_prefix=f"{tag}%")

    assert [profile.uid for profile in underscore] == [literal.uid]
    assert percent == []


async def test_list_profiles_filters_email_case_insensitively(database: Database) -> None:
    tag = secrets.token_hex(4)
    principal = Principal(uid=new_uid(), email=f"Mixed.{tag}@Example.COM")
    async with database.unit_of_work() as session:
        await logic.get_or_create_profile(session, principal)

    async with database.unit_of_work() as session:
        page = await logic.list_profiles(session, 0, "", f"MIXED.{tag}@")

    assert [profile.uid for profile in page.profiles] == [principal.uid]
    assert page.profiles[0].email == f"mixed.{tag}@example.com"


async def test_list_profiles_returns_next_page_token(database: Database) -> None:
    tag = secrets.token_hex(4)
    async with database.unit_of_work() as session:
        for index in range(3):
            await store.add_user(session, new_profile(f"{tag}-{index}", email=f"{tag}-{index}@example.com"))

    async with database.unit_of_work() as session:
        first = await logic.list_profiles(session, 2, "", tag)
        second = await logic.list_profiles(session, 2, first.next_page_token, tag)

    assert [profile.uid for profile in first.profiles] == [f"{tag}-0", f"{tag}-1"]
    assert first.next_page_token != ""
    assert [profile.uid for profile in second.profiles] == [f"{tag}-2"]
    assert second.next_page_token == ""


async def test_update_user_with_stale_version_writes_nothing(database: Database) -> None:
    uid = new_uid()
    async with database.unit_of_work() as session:
        await store.add_user(session, new_profile(uid))

    changed = new_profile(uid, display_name="Changed", version=3)
    async with database.unit_of_work() as session:
        written = await store.update_user(session, changed, expected_version=2)
    async with database.unit_of_work() as session:
        stored = await store.get_user(session, uid)

    assert written is False
    assert stored.display_name == "Ada"
    assert stored.version == 1


async def test_update_user_replaces_preferences(database: Database) -> None:
    uid = new_uid()
    async with database.unit_of_work() as session:
        await store.add_user(session, new_profile(uid, preferences={"keep": "1", "change": "old", "drop": "x"}))

    changed = new_profile(uid, version=2, preferences={"keep": "1", "change": "new", "add": "y"})
    async with database.unit_of_work() as session:
        written = await store.update_user(session, changed, expected_version=1)
    async with database.unit_of_work() as session:
        stored = await store.get_user(session, uid)

    assert written is True
    assert stored.preferences == {"keep": "1", "change": "new", "add": "y"}
    assert stored.version == 2


async def test_concurrent_first_calls_create_one_profile(database: Database) -> None:
    principal = Principal(uid=new_uid(), email="race@example.com", claims={"name": "Race"})

    async def get_me() -> UserProfile:
        async with database.unit_of_work() as session:
            return await logic.get_or_create_profile(session, principal)

    profiles = await asyncio.gather(*(get_me() for _ in range(8)))

    assert {profile.uid for profile in profiles} == {principal.uid}
    assert len({profile.create_time for profile in profiles}) == 1
    assert await count_users(database, principal.uid) == 1


async def test_concurrent_updates_with_one_etag_let_one_win(database: Database) -> None:
    principal = Principal(uid=new_uid(), email="etag@example.com")
    async with database.unit_of_work() as session:
        etag = (await logic.get_or_create_profile(session, principal)).etag

    async def update(bio: str) -> UserProfile:
        async with database.unit_of_work() as session:
            return await logic.update_profile(session, principal, {"bio": bio}, ["bio"], etag)

    results = await asyncio.gather(update("first"), update("second"), return_exceptions=True)

    winners = [result for result in results if isinstance(result, UserProfile)]
    losers = [result for result in results if isinstance(result, Aborted)]
    assert len(winners) == 1
    assert len(losers) == 1
    async with database.unit_of_work() as session:
        stored = await store.get_user(session, principal.uid)
    assert stored.bio == winners[0].bio
    assert stored.etag == winners[0].etag


async def test_concurrent_updates_without_etag_all_apply(database: Database) -> None:
    principal = Principal(uid=new_uid(), email="last-writer@example.com")
    async with database.unit_of_work() as session:
        await logic.get_or_create_profile(session, principal)

    async def update(key: str) -> UserProfile:
        async with database.unit_of_work() as session:
            return await logic.update_profile(session, principal, {"bio": key}, ["bio"])

    results = await asyncio.gather(update("a"), update("b"))

    async with database.unit_of_work() as session:
        stored = await store.get_user(session, principal.uid)
    assert stored.version == 3
    assert stored.bio in {result.bio for result in results}


async def test_preferences_do_not_load_lazily(database: Database) -> None:
    uid = new_uid()
    async with database.unit_of_work() as session:
        await store.add_user(session, new_profile(uid, preferences={"theme": "dark"}))

    async with database.unit_of_work() as session:
        row = await session.get(UserRow, uid)
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            _ = row.preferences
        eager = (
            await session.execute(
                select(UserRow)
                .where(UserRow.uid == uid)
                .options(selectinload(UserRow.preferences))
                .execution_options(populate_existing=True)
            )
        ).scalar_one()

    assert [(preference.key, preference.value) for preference in eager.preferences] == [("theme", "dark")]


async def test_deleting_user_cascades_to_preferences(database: Database) -> None:
    uid = new_uid()
    async with database.unit_of_work() as session:
        await store.add_user(session, new_profile(uid, preferences={"theme": "dark"}))

    async with database.unit_of_work() as session:
        # A plain DELETE, so only the foreign key's ON DELETE CASCADE can remove the preferences.
        await session.execute(delete(UserRow).where(UserRow.uid == uid).execution_options(synchronize_session=False))
    async with database.unit_of_work() as session:
        remaining = await session.scalar(
            select(func.count()).select_from(UserPreferenceRow).where(UserPreferenceRow.uid == uid)
        )

    assert remaining == 0


async def test_update_me_response_keeps_preferences(database: Database) -> None:
    handler = UserHandler(database)
    principal = Principal(uid=new_uid(), email="prefs@example.com")
    request = user_pb2.UpdateMeRequest(
        user=user_pb2.User(preferences={"theme": "dark", "density": "compact"}, display_name="Grace"),
        update_mask=FieldMask(paths=["preferences", "display_name"]),
    )

    with signed_in(principal):
        updated = await handler.update_me(request, None)
        read_back = await handler.get_me(user_pb2.GetMeRequest(), None)

    assert dict(updated.user.preferences) == {"theme": "dark", "density": "compact"}
    assert updated.user.display_name == "Grace"
    assert dict(read_back.user.preferences) == {"theme": "dark", "density": "compact"}
    assert read_back.user.etag == updated.user.etag


async def test_get_me_creates_profile_from_claims(database: Database) -> None:
    handler = UserHandler(database)
    principal = Principal(
        uid=new_uid(),
        email="New.User@Example.com",
        claims={"name": "New User", "picture": "https://example.com/photo.png"},
    )

    with signed_in(principal):
        response = await handler.get_me(user_pb2.GetMeRequest(), None)

    user = response.user
    assert user.uid == principal.uid
    assert user.email == "new.user@example.com"
    assert user.display_name == "New User"
    assert user.photo_url == "https://example.com/photo.png"
    assert user.etag == "1"
    assert user.create_time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)


async def test_get_user_of_unknown_uid_is_not_found(database: Database) -> None:
    handler = UserHandler(database)
    uid = new_uid()

    with signed_in(Principal(uid="admin", roles=("admin",))), pytest.raises(NotFound) as caught:
        await handler.get_user(user_pb2.GetUserRequest(uid=uid), None)

    assert caught.value.message == f"user {uid} not found"


async def test_list_users_handler_returns_page(database: Database) -> None:
    handler = UserHandler(database)
    tag = secrets.token_hex(4)
    async with database.unit_of_work() as session:
        for index in range(3):
            await store.add_user(session, new_profile(f"{tag}-{index}", email=f"{tag}-{index}@example.com"))

    with signed_in(Principal(uid="admin", roles=("admin",))):
        first = await handler.list_users(user_pb2.ListUsersRequest(page_size=2, email_prefix=tag), None)
        second = await handler.list_users(
            user_pb2.ListUsersRequest(page_size=2, email_prefix=tag, page_token=first.next_page_token), None
        )

    assert [user.uid for user in first.users] == [f"{tag}-0", f"{tag}-1"]
    assert [user.uid for user in second.users] == [f"{tag}-2"]
    assert second.next_page_token == ""
