"""Values the integration tests build again and again: settings for a URL, and user profiles."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from app.settings import Settings
from app.users.model import UserProfile

NOW = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def settings_for(database_url: str, **overrides: object) -> Settings:
    """Build test settings for a database URL."""
    return Settings(app_env="test", database_url=database_url, **overrides)


def new_profile(uid: str, email: str = "", **fields: object) -> UserProfile:
    """Build a profile for uid, created at NOW, with any field overridden."""
    profile = UserProfile(
        uid=uid,
        email=email or f"{uid}@example.com",
        display_name="Ada",
        photo_url="",
        locale="en",
        time_zone="Europe/Paris",
        bio="",
        create_time=NOW,
        update_time=NOW,
    )
    return dataclasses.replace(profile, **fields)
