"""Conversions between UserProfile and the functions.user.v1 messages."""

from __future__ import annotations

from functions.user.v1 import user_pb2

from app.platform.timestamps import timestamp_of
from app.users.model import UserProfile
from app.users.validation import UPDATABLE_FIELDS


def user_to_proto(profile: UserProfile) -> user_pb2.User:
    """Build the User message of a profile."""
    return user_pb2.User(
        uid=profile.uid,
        email=profile.email,
        display_name=profile.display_name,
        photo_url=profile.photo_url,
        locale=profile.locale,
        time_zone=profile.time_zone,
        bio=profile.bio,
        preferences=profile.preferences,
        create_time=timestamp_of(profile.create_time),
        update_time=timestamp_of(profile.update_time),
        etag=profile.etag,
    )


def updatable_values(user: user_pb2.User) -> dict[str, object]:
    """Return the value of every field UpdateMe may change, as plain strings and a dict."""
    values: dict[str, object] = {name: getattr(user, name) for name in UPDATABLE_FIELDS if name != "preferences"}
    values["preferences"] = dict(user.preferences)
    return values