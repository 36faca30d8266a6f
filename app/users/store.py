"""Queries on the users tables. Functions take the caller's session and never commit."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Insert, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from app.platform.errors import NotFound
from app.users.model import UserPreferenceRow, UserProfile, UserRow, profile_from_row


async def find_user(session: AsyncSession, uid: str) -> UserProfile | None:
    """Load a profile with its preferences, or return None when the uid has none.

    One query, a LEFT JOIN yielding a row per preference, read without ORM objects: this is
    the hot path of GetMe, where building ORM rows cost more than the query itself.
    """
    users = UserRow.__table__
    preferences = UserPreferenceRow.__table__
    statement = (
        select(users, preferences.c.key.label("preference_key"), preferences.c.value.label("preference_value"))
        .select_from(users.outerjoin(preferences, preferences.c.uid == users.c.uid))
        .where(users.c.uid == uid)
    )
    rows = (await session.execute(statement)).mappings().all()
    if not rows:
        return None

    first = rows[0]
    return UserProfile(
        uid=first["uid"],
        email=first["email"],
        display_name=first["display_name"],
        photo_url=first["photo_url"],
        locale=first["locale"],
        time_zone=first["time_zone"],
        bio=first["bio"],
        create_time=first["create_time"],
        update_time=first["update_time"],
        version=first["version"],
        preferences={row["preference_key"]: row["preference_value"] for row in rows if row["preference_key"] is not None},
        delete_time=first["delete_time"],
    )


async def get_user(session: AsyncSession, uid: str) -> UserProfile:
    """Load a profile with its preferences, or raise NotFound when the uid has none."""
    profile = await find_user(session, uid)
    if profile is None:
        raise NotFound(f"user {uid} not found")
    return profile


async def list_users(
    session: AsyncSession, *, limit: int, after_uid: str = "", email_prefix: str = ""
) -> list[UserProfile]:
    """List at most `limit` profiles ordered by uid, starting after `after_uid`, without deleted ones.

    `email_prefix` must be lower-case, like the stored emails.
    """
    statement = (
        select(UserRow)
        .where(UserRow.delete_time.is_(None))
        .options(selectinload(UserRow.preferences))
        .order_by(UserRow.uid)
        .limit(limit)
        .execution_options(populate_existing=True)
    )
    if after_uid:
        statement = statement.where(UserRow.uid > after_uid)
    if email_prefix:
        # autoescape keeps '%' and '_' in the prefix literal.
        statement = statement.where(UserRow.email.startswith(email_prefix, autoescape=True))
    rows = (await session.execute(statement)).scalars().all()
    return [profile_from_row(row) for row in rows]


async def find_delete_time(session: AsyncSession, uid: str) -> datetime | None:
    """Return when the profile of `uid` was deleted, or None when it is not deleted or does not exist."""
    return await session.scalar(select(UserRow.delete_time).where(UserRow.uid == uid))


async def add_user(session: AsyncSession, profile: UserProfile) -> bool:
    """Insert a profile unless its uid already has one; return whether it was inserted.

    ON CONFLICT DO NOTHING makes concurrent first inserts of one uid race-safe: the loser
    waits for the winner's commit and inserts nothing, with no IntegrityError to recover from.
    """
    values = {
        "uid": profile.uid,
        "email": profile.email,
        "display_name": profile.display_name,
        "photo_url": profile.photo_url,
        "locale": profile.locale,
        "time_zone": profile.time_zone,
        "bio": profile.bio,
        "version": profile.version,
        "create_time": profile.create_time,
        "update_time": profile.update_time,
    }
    statement = _insert_ignoring_conflicts(session, values)
    result = await session.execute(statement)
    inserted = result.rowcount == 1
    if inserted and profile.preferences:
        await _insert_preferences(session, profile.uid, profile.preferences)
    return inserted


async def update_user(session: AsyncSession, profile: UserProfile, *, expected_version: int) -> bool:
    """Write a profile if the stored version is still `expected_version`; return whether it was written.

    The version check is part of the UPDATE statement, so of two concurrent writers of one
    version exactly one succeeds on every engine and isolation level.
    """
    statement = (
        update(UserRow)
        .where(UserRow.uid == profile.uid, UserRow.version == expected_version)
        .values(
            email=profile.email,
            display_name=profile.display_name,
            photo_url=profile.photo_url,
            locale=profile.locale,
            time_zone=profile.time_zone,
            bio=profile.bio,
            version=profile.version,
            update_time=profile.update_time,
            delete_time=profile.delete_time,
        )
        .execution_options(synchronize_session=False)
    )
    result = await session.execute(statement)
    if result.rowcount != 1:
        return False

    await _replace_preferences(session, profile.uid, profile.preferences)
    return True


async def _replace_preferences(session: AsyncSession, uid: str, preferences: dict[str, str]) -> None:
    stored_statement = select(UserPreferenceRow.key, UserPreferenceRow.value).where(UserPreferenceRow.uid == uid)
    stored = {key: value for key, value in await session.execute(stored_statement)}

    removed = [key for key in stored if key not in preferences]
    if removed:
        await session.execute(
            delete(UserPreferenceRow)
            .where(UserPreferenceRow.uid == uid, UserPreferenceRow.key.in_(removed))
            .execution_options(synchronize_session=False)
        )

    for key, value in preferences.items():
        if key in stored and stored[key] != value:
            await session.execute(
                update(UserPreferenceRow)
                .where(UserPreferenceRow.uid == uid, UserPreferenceRow.key == key)
                .values(value=value)
                .execution_options(synchronize_session=False)
            )

    added = {key: value for key, value in preferences.items() if key not in stored}
    if added:
        await _insert_preferences(session, uid, added)


async def _insert_preferences(session: AsyncSession, uid: str, preferences: dict[str, str]) -> None:
    rows = [{"uid": uid, "key": key, "value": value} for key, value in preferences.items()]
    await session.execute(insert(UserPreferenceRow), rows)


def _insert_ignoring_conflicts(session: AsyncSession, values: dict[str, object]) -> Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(UserRow).values(values).on_conflict_do_nothing(index_elements=[UserRow.uid])
    if dialect == "sqlite":
        return sqlite.insert(UserRow).values(values).on_conflict_do_nothing(index_elements=[UserRow.uid])
    raise NotImplementedError(f"add_user supports postgresql and sqlite: got dialect {dialect!r}")
