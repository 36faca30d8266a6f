"""User profile use cases: validation, masks, etags, paging and first-call creation.

The use cases run against a migrated SQLite file, which is fast and exercises the real store.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from functions.user.v1 import user_pb2

from app.platform.context import Principal
from app.platform.db import Database, migrate
from app.platform.errors import (
    Aborted,
    FieldViolation,
    InvalidInput,
    NotFound,
    Unauthenticated,
)
from app.settings import Settings
from app.users import logic, store
from app.users.handler import UserHandler
from app.users.model import UserProfile
from app.users.validation import known_time_zones

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def database(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Database]:
    path = tmp_path_factory.mktemp("users-logic") / "functions.db"
    settings = Settings(app_env="test", database_url=f"sqlite+aiosqlite:///{path}")
    await migrate(settings)
    database = Database.from_settings(settings)
    yield database
    await database.dispose()


def new_principal(**claims: object) -> Principal:
    uid = f"user-{secrets.token_hex(6)}"
    return Principal(uid=uid, email=f"{uid}@example.com", claims=dict(claims))


async def update(
    database: Database, principal: Principal, values: dict[str, object], mask: list[str], etag: str = ""
) -> UserProfile:
    async with database.unit_of_work() as session:
        return await logic.update_profile(session, principal, values, mask, etag, now=NOW)


async def violations_of(database: Database, values: dict[str, object], mask: list[str]) -> list[FieldViolation]:
    with pytest.raises(InvalidInput) as caught:
        await update(database, new_principal(), values, mask)
    return caught.value.violations


@pytest.mark.parametrize(
    ("field", "value", "description"),
    [
        ("display_name", "x" * 90, "must be at most 64 characters: got 90"),
        ("display_name", "Ada\x07", "must not contain control characters: got U+0007 at index 3"),
        ("display_name", "Ada\u2028Lovelace", "must not contain control characters: got U+2028 at index 3"),
        ("photo_url", "http://example.com/a.png", "must be an https URL: got scheme 'http'"),
        ("photo_url", "https:///a.png", "must be an https URL with a host: got 'https:///a.png'"),
        ("photo_url", "https://example.com/a b.png", "must be a URL without spaces or control characters: got U+0020 at index 21"),
        ("photo_url", "https://example.com/" + "a" * 2030, "must be at most 2048 characters: got 2050"),
        ("photo_url", "https://[::1/a.png", "must be an https URL: got 'https://[::1/a.png'"),
        ("locale", "english", "must be a BCP 47 language tag such as 'en' or 'pt-BR': got 'english'"),
        ("locale", "pt_BR", "must be a BCP 47 language tag such as 'en' or 'pt-BR': got 'pt_BR'"),
        ("time_zone", "Mars/Olympus_Mons", "must be an IANA time zone name such as 'Europe/Paris': got 'Mars/Olympus_Mons'"),
        ("time_zone", "localtime", "must be an IANA time zone name such as 'Europe/Paris': got 'localtime'"),
        ("bio", "b" * 501, "must be at most 500 characters: got 501"),
        ("bio", "line\x00", "must not contain control characters: got U+0000 at index 4"),
    ],
)
async def test_invalid_field_is_rejected(database: Database, field: str, value: str, description: str) -> None:
    violations = await violations_of(database, {field: value}, [field])

    assert violations == [FieldViolation(f"user.{field}", description)]


@pytest.mark.parametrize(
    ("preferences", "description"),
    [
        ({f"k{index}": "v" for index in range(51)}, "must have at most 50 entries: got 51"),
        ({"": "v"}, "keys must be 1 to 64 characters of letters, digits, '_', '.' and '-': got ''"),
        ({"a b": "v"}, "keys must be 1 to 64 characters of letters, digits, '_', '.' and '-': got 'a b'"),
        ({"k" * 65: "v"}, "keys must be 1 to 64 characters of letters, digits, '_', '.' and '-': got " + repr("k" * 40) + "... (65 characters)"),
        ({"theme": "v" * 1025}, "value of key 'theme' must be at most 1024 characters: got 1025"),
    ],
)
async def test_invalid_preferences_are_rejected(
    database: Database, preferences: dict[str, str], description: str
) -> None:
    violations = await violations_of(database, {"preferences": preferences}, ["preferences"])

    assert violations == [FieldViolation("user.preferences", description)]


async def test_every_invalid_field_is_reported(database: Database) -> None:
    violations = await violations_of(database, {"display_name": "x" * 65, "bio": "b" * 501}, ["display_name", "bio"])

    assert [violation.field for violation in violations] == ["user.display_name", "user.bio"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("display_name", "x" * 64),
        ("display_name", "Zoë 👩‍👩‍👧"),
        ("photo_url", "https://lh3.googleusercontent.com/a/photo=s96-c"),
        ("locale", "en"),
        ("locale", "pt-BR"),
        ("locale", "zh-Hant-TW"),
        ("locale", "es-419"),
        ("time_zone", "Europe/Paris"),
        ("time_zone", "UTC"),
        ("bio", "two\nlines\tand a tab"),
        ("bio", "b" * 500),
    ],
)
async def test_valid_field_is_stored(database: Database, field: str, value: str) -> None:
    profile = await update(database, new_principal(), {field: value}, [field])

    assert getattr(profile, field) == value


async def test_empty_value_in_mask_clears_field(database: Database) -> None:
    principal = new_principal()
    await update(database, principal, {"bio": "hello", "locale": "en"}, ["bio", "locale"])

    profile = await update(database, principal, {"bio": "", "locale": "fr"}, ["bio"])

    assert profile.bio == ""
    assert profile.locale == "en"


async def test_fields_outside_mask_are_ignored(database: Database) -> None:
    profile = await update(database, new_principal(), {"display_name": "Ada", "bio": "b" * 900}, ["display_name"])

    assert profile.display_name == "Ada"
    assert profile.bio == ""


async def test_preferences_are_replaced_as_a_whole(database: Database) -> None:
    principal = new_principal()
    await update(database, principal, {"preferences": {"theme": "dark", "density": "compact"}}, ["preferences"])

    profile = await update(database, principal, {"preferences": {"theme": "light"}}, ["preferences"])

    assert profile.preferences == {"theme": "light"}


async def test_empty_mask_is_rejected(database: Database) -> None:
    violations = await violations_of(database, {"bio": "x"}, [])

    assert violations == [
        FieldViolation(
            "update_mask.paths",
            "must name at least one of display_name, photo_url, locale, time_zone, bio, preferences: got none",
        )
    ]


async def test_unknown_mask_path_is_rejected(database: Database) -> None:
    violations = await violations_of(database, {}, ["bio", "email", "user.bio"])

    allowed = "display_name, photo_url, locale, time_zone, bio, preferences"
    assert violations == [
        FieldViolation("update_mask.paths", f"must contain only {allowed}: got 'email'"),
        FieldViolation("update_mask.paths", f"must contain only {allowed}: got 'user.bio'"),
    ]


async def test_etag_changes_on_every_update(database: Database) -> None:
    principal = new_principal()
    first = await update(database, principal, {"bio": "one"}, ["bio"])

    second = await update(database, principal, {"bio": "one"}, ["bio"], etag=first.etag)

    assert second.etag != first.etag


async def test_stale_etag_is_aborted(database: Database) -> None:
    principal = new_principal()
    first = await update(database, principal, {"bio": "one"}, ["bio"])
    await update(database, principal, {"bio": "two"}, ["bio"], etag=first.etag)

    with pytest.raises(Aborted) as caught:
        await update(database, principal, {"bio": "three"}, ["bio"], etag=first.etag)

    assert caught.value.message == (
        f"user {principal.uid} was modified since etag '{first.etag}'; read it again and retry"
    )


async def test_update_before_first_read_creates_profile(database: Database) -> None:
    principal = new_principal(name="Ada")

    profile = await update(database, principal, {"bio": "hello"}, ["bio"])

    assert profile.display_name == "Ada"
    assert profile.bio == "hello"
    assert profile.version == 2


async def test_first_read_creates_profile_from_claims(database: Database) -> None:
    principal = Principal(
        uid=f"user-{secrets.token_hex(6)}",
        email="Ada@Example.COM",
        claims={"name": "Ada Lovelace", "picture": "https://example.com/ada.png"},
    )

    async with database.unit_of_work() as session:
        profile = await logic.get_or_create_profile(session, principal, now=NOW)

    assert profile.email == "ada@example.com"
    assert profile.display_name == "Ada Lovelace"
    assert profile.photo_url == "https://example.com/ada.png"
    assert profile.create_time == NOW
    assert profile.etag == "1"


async def test_second_read_returns_stored_profile(database: Database) -> None:
    principal = new_principal(name="Ada")
    async with database.unit_of_work() as session:
        first = await logic.get_or_create_profile(session, principal, now=NOW)

    async with database.unit_of_work() as session:
        second = await logic.get_or_create_profile(session, principal, now=NOW + timedelta(hours=1))

    assert second == first


@pytest.mark.parametrize(
    ("claims", "display_name", "photo_url"),
    [
        ({"name": "N" * 80}, "N" * 64, ""),
        ({"name": "Ada\x00\x1b[31m Lovelace"}, "Ada[31m Lovelace", ""),
        ({"name": 42, "picture": ["https://example.com/a.png"]}, "", ""),
        ({"picture": "http://example.com/a.png"}, "", ""),
        ({"picture": "javascript:alert(1)"}, "", ""),
    ],
)
def test_unusable_claims_are_cleaned(claims: dict[str, object], display_name: str, photo_url: str) -> None:
    principal = Principal(uid="u", email="u@example.com", claims=claims)

    profile = logic.profile_from_principal(principal, NOW)

    assert profile.display_name == display_name
    assert profile.photo_url == photo_url


async def test_unknown_uid_is_not_found(database: Database) -> None:
    with pytest.raises(NotFound) as caught:
        async with database.unit_of_work() as session:
            await logic.get_profile(session, "nobody-here")

    assert caught.value.message == "user nobody-here not found"


async def test_overlong_uid_is_rejected(database: Database) -> None:
    with pytest.raises(InvalidInput) as caught:
        async with database.unit_of_work() as session:
            await logic.get_profile(session, "u" * 129)

    assert caught.value.violations == [FieldViolation("uid", "must be at most 128 characters: got 129")]


async def add_users(database: Database, tag: str, count: int) -> list[str]:
    uids = [f"{tag}-{index:03d}" for index in range(count)]
    async with database.unit_of_work() as session:
        for uid in uids:
            await store.add_user(session, logic.profile_from_principal(Principal(uid=uid, email=f"{uid}@example.com"), NOW))
    return uids


async def list_page(database: Database, page_size: int, page_token: str, email_prefix: str) -> logic.ProfilePage:
    async with database.unit_of_work() as session:
        return await logic.list_profiles(session, page_size, page_token, email_prefix)


async def test_page_size_zero_means_fifty(database: Database) -> None:
    tag = f"fifty-{secrets.token_hex(4)}"
    await add_users(database, tag, 51)

    page = await list_page(database, 0, "", tag)

    assert len(page.profiles) == 50
    assert page.next_page_token != ""


async def test_page_size_above_maximum_is_capped(database: Database) -> None:
    tag = f"capped-{secrets.token_hex(4)}"
    await add_users(database, tag, 101)

    page = await list_page(database, 1000, "", tag)

    assert len(page.profiles) == 100
    assert page.next_page_token != ""


async def test_negative_page_size_is_rejected(database: Database) -> None:
    with pytest.raises(InvalidInput) as caught:
        await list_page(database, -1, "", "")

    assert caught.value.violations == [FieldViolation("page_size", "must not be negative: got -1")]


async def test_pages_cover_every_user_once(database: Database) -> None:
    tag = f"walk-{secrets.token_hex(4)}"
    uids = await add_users(database, tag, 7)

    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await list_page(database, 3, token, tag)
        seen.extend(profile.uid for profile in page.profiles)
        token = page.next_page_token
        if not token:
            break

    assert seen == uids


@pytest.mark.parametrize(
    "page_token",
    [
        "garbage",
        "v1.!!!!",
        "v1." + "a" * 7,
        "v2.WyJ1IiwiIl0",
        "v1.eyJhZnRlciI6InUifQ",
        "v1.WyIiLCIiXQ",
        "v1.WzEsMl0",
    ],
)
async def test_invalid_page_token_is_rejected(database: Database, page_token: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await list_page(database, 10, page_token, "")

    assert [violation.field for violation in caught.value.violations] == ["page_token"]
    assert caught.value.violations[0].description.startswith("must be a next_page_token returned by ListUsers: got ")


async def test_page_token_from_other_prefix_is_rejected(database: Database) -> None:
    token = logic.encode_page_token("someone", "alpha")

    with pytest.raises(InvalidInput) as caught:
        await list_page(database, 10, token, "beta")

    assert caught.value.violations == [
        FieldViolation("page_token", "must come from a request with the same email_prefix: got a token for 'alpha'")
    ]


def test_page_token_round_trips() -> None:
    token = logic.encode_page_token("uid/with+odd=chars", "ada@")

    assert token.startswith("v1.")
    assert logic.decode_page_token(token, "ada@") == "uid/with+odd=chars"


def test_time_zones_are_loaded() -> None:
    assert "Europe/Paris" in known_time_zones()


async def test_handler_without_principal_is_unauthenticated(database: Database) -> None:
    handler = UserHandler(database)

    with pytest.raises(Unauthenticated):
        await handler.get_me(user_pb2.GetMeRequest(), None)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("display_name", "admin\u202eevil", "bidirectional control"),
        ("display_name", "\u200b\u200b", "visible character"),
        ("display_name", "   ", "visible character"),
        ("photo_url", "https://user:pw@169.254.169.254/x.png", "user name or password"),
    ],
)
def test_deceptive_profile_values_are_invalid(field: str, value: str, problem: str) -> None:
    from app.users.validation import check_profile_changes

    violations = check_profile_changes({field: value})

    assert [v.field for v in violations] == [f"user.{field}"]
    assert problem in violations[0].description


@pytest.mark.parametrize("name", ["Zoë", "李小龙", "Family 👨\u200d👩\u200d👧", "Ada Lovelace"])
def test_ordinary_display_names_are_valid(name: str) -> None:
    from app.users.validation import check_profile_changes

    assert check_profile_changes({"display_name": name}) == []
