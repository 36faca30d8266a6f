"""The users tables and the UserProfile domain type."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.platform.db import Base, UtcDateTime

UID_MAX_LENGTH = 128
EMAIL_MAX_LENGTH = 320
DISPLAY_NAME_MAX_LENGTH = 64
PHOTO_URL_MAX_LENGTH = 2048
LOCALE_MAX_LENGTH = 35
TIME_ZONE_MAX_LENGTH = 64
BIO_MAX_LENGTH = 500
PREFERENCES_MAX_ENTRIES = 50
PREFERENCE_KEY_MAX_LENGTH = 64
PREFERENCE_VALUE_MAX_LENGTH = 1024


class UserRow(Base):
    """One row of `users`: the profile of one Firebase user."""

    __tablename__ = "users"
    # varchar_pattern_ops lets Postgres use the index for `email LIKE 'prefix%'` under any collation.
    __table_args__ = (Index("ix_users_email", "email", postgresql_ops={"email": "varchar_pattern_ops"}),)

    uid: Mapped[str] = mapped_column(String(UID_MAX_LENGTH), primary_key=True)
    # Stored lower-cased, so the email prefix filter can compare without lower().
    email: Mapped[str] = mapped_column(String(EMAIL_MAX_LENGTH))
    display_name: Mapped[str] = mapped_column(String(DISPLAY_NAME_MAX_LENGTH))
    photo_url: Mapped[str] = mapped_column(String(PHOTO_URL_MAX_LENGTH))
    locale: Mapped[str] = mapped_column(String(LOCALE_MAX_LENGTH))
    time_zone: Mapped[str] = mapped_column(String(TIME_ZONE_MAX_LENGTH))
    bio: Mapped[str] = mapped_column(String(BIO_MAX_LENGTH))
    # Incremented by every update; the etag is derived from it.
    version: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime)
    # Set by DeleteMe. The row stays as a tombstone with its personal fields cleared, so that
    # GetMe cannot create the profile again from a token of the deleted user.
    delete_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    # lazy="raise" turns a forgotten selectinload into an error at once, instead of an
    # implicit query that fails with MissingGreenlet under asyncio.
    preferences: Mapped[list[UserPreferenceRow]] = relationship(
        lazy="raise",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="UserPreferenceRow.key",
    )


class UserPreferenceRow(Base):
    """One row of `user_preferences`: a client preference of one user."""

    __tablename__ = "user_preferences"

    uid: Mapped[str] = mapped_column(ForeignKey("users.uid", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(PREFERENCE_KEY_MAX_LENGTH), primary_key=True)
    value: Mapped[str] = mapped_column(String(PREFERENCE_VALUE_MAX_LENGTH))


@dataclass(frozen=True, slots=True)
class UserProfile:
    """A user's profile, independent of the tables and of the proto messages."""

    uid: str
    email: str
    display_name: str
    photo_url: str
    locale: str
    time_zone: str
    bio: str
    create_time: datetime
    update_time: datetime
    version: int = 1
    preferences: dict[str, str] = field(default_factory=dict)
    delete_time: datetime | None = None

    @property
    def is_deleted(self) -> bool:
        """Whether DeleteMe deleted this profile, which is then a tombstone without personal data."""
        return self.delete_time is not None

    @property
    def etag(self) -> str:
        """The version tag a client sends back to update only the version it read."""
        return str(self.version)


def profile_from_row(row: UserRow) -> UserProfile:
    """Convert a row whose preferences were loaded eagerly into a UserProfile."""
    return UserProfile(
        uid=row.uid,
        email=row.email,
        display_name=row.display_name,
        photo_url=row.photo_url,
        locale=row.locale,
        time_zone=row.time_zone,
        bio=row.bio,
        create_time=row.create_time,
        update_time=row.update_time,
        version=row.version,
        preferences={preference.key: preference.value for preference in row.preferences},
        delete_time=row.delete_time,
    )
