"""Rules for profile fields and update masks, reported as field violations.

Each `check_*` function returns the description of what is wrong with a value, or None when
the value is valid. Descriptions follow "must be <rule>: got <what was received>" and echo
the length, not the text, of free-text fields, because those carry personal data.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import zoneinfo
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from app.platform.errors import FieldViolation, shown
from app.users.model import (
    BIO_MAX_LENGTH,
    DISPLAY_NAME_MAX_LENGTH,
    LOCALE_MAX_LENGTH,
    PHOTO_URL_MAX_LENGTH,
    PREFERENCE_KEY_MAX_LENGTH,
    PREFERENCE_VALUE_MAX_LENGTH,
    PREFERENCES_MAX_ENTRIES,
)

# The profile fields UpdateMe may change, in proto field order.
UPDATABLE_FIELDS = ("display_name", "photo_url", "locale", "time_zone", "bio", "preferences")

# A BCP 47 language tag without extensions or private use: language, optional script,
# optional region, then variants ("en", "pt-BR", "zh-Hant-TW", "de-CH-1996").
_LOCALE_PATTERN = re.compile(
    r"[A-Za-z]{2,3}(-[A-Za-z]{4})?(-(?:[A-Za-z]{2}|[0-9]{3}))?(-(?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*"
)
_PREFERENCE_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
# Names in the tz database that are not places: "localtime" depends on the host.
_NOT_TIME_ZONES = frozenset({"localtime", "posixrules", "Factory"})
# Line breaks and tabs are allowed in a bio, but no other control character.
_BIO_ALLOWED_CONTROLS = frozenset("\n\r\t")


@functools.cache
def known_time_zones() -> frozenset[str]:
    """Return the IANA time zone names of the tz database this process can load."""
    return frozenset(zoneinfo.available_timezones() - _NOT_TIME_ZONES)


# Bidirectional embedding, override and isolate controls: they can make a name display as
# another one ("evil" shown as "live"), so names must not carry them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_display_name(value: str) -> str | None:
    if len(value) > DISPLAY_NAME_MAX_LENGTH:
        return f"must be at most {DISPLAY_NAME_MAX_LENGTH} characters: got {len(value)}"
    for index, character in enumerate(value):
        if character in _BIDI_CONTROLS:
            return f"must not contain bidirectional control characters: got U+{ord(character):04X} at index {index}"
    if value and all(unicodedata.category(character) in ("Cf", "Zs") for character in value):
        return "must contain a visible character: got only spaces and invisible characters"
    return _check_no_control_characters(value, allowed=frozenset())


def check_photo_url(value: str) -> str | None:
    if not value:
        return None
    if len(value) > PHOTO_URL_MAX_LENGTH:
        return f"must be at most {PHOTO_URL_MAX_LENGTH} characters: got {len(value)}"
    for index, character in enumerate(value):
        if character.isspace() or is_control_character(character):
            return f"must be a URL without spaces or control characters: got U+{ord(character):04X} at index {index}"

    try:
        parts = urlsplit(value)
        hostname = parts.hostname
    except ValueError:
        return f"must be an https URL: got {shown(value)}"
    if parts.scheme.lower() != "https":
        return f"must be an https URL: got scheme {shown(parts.scheme)}"
    if not hostname:
        return f"must be an https URL with a host: got {shown(value)}"
    if parts.username is not None or parts.password is not None:
        return "must be an https URL without a user name or password"
    return None


def check_locale(value: str) -> str | None:
    if not value:
        return None
    if len(value) > LOCALE_MAX_LENGTH or not _LOCALE_PATTERN.fullmatch(value):
        return f"must be a BCP 47 language tag such as 'en' or 'pt-BR': got {shown(value)}"
    return None


def check_time_zone(value: str) -> str | None:
    if not value:
        return None
    if value not in known_time_zones():
        return f"must be an IANA time zone name such as 'Europe/Paris': got {shown(value)}"
    return None


def check_bio(value: str) -> str | None:
    if len(value) > BIO_MAX_LENGTH:
        return f"must be at most {BIO_MAX_LENGTH} characters: got {len(value)}"
    return _check_no_control_characters(value, allowed=_BIO_ALLOWED_CONTROLS)


def check_preferences(preferences: Mapping[str, str]) -> list[str]:
    """Return one description per problem with the preference map."""
    problems = []
    if len(preferences) > PREFERENCES_MAX_ENTRIES:
        problems.append(f"must have at most {PREFERENCES_MAX_ENTRIES} entries: got {len(preferences)}")

    for key, value in preferences.items():
        if not 1 <= len(key) <= PREFERENCE_KEY_MAX_LENGTH or not _PREFERENCE_KEY_PATTERN.fullmatch(key):
            problems.append(
                f"keys must be 1 to {PREFERENCE_KEY_MAX_LENGTH} characters of letters, digits, '_', '.' and '-': "
                f"got {shown(key)}"
            )
        elif len(value) > PREFERENCE_VALUE_MAX_LENGTH:
            problems.append(
                f"value of key {shown(key)} must be at most {PREFERENCE_VALUE_MAX_LENGTH} characters: got {len(value)}"
            )
        elif (problem := _check_no_control_characters(value, allowed=_BIO_ALLOWED_CONTROLS)) is not None:
            problems.append(f"value of key {shown(key)} {problem}")
    return problems


def check_lookup_text(value: str) -> str | None:
    """Check a string used to look data up (a uid, an email prefix): no control characters.

    Postgres cannot store or compare NUL in text, and no uid or email contains a control character.
    """
    return _check_no_control_characters(value, allowed=frozenset())


_FIELD_CHECKS = {
    "display_name": check_display_name,
    "photo_url": check_photo_url,
    "locale": check_locale,
    "time_zone": check_time_zone,
    "bio": check_bio,
}


def check_update_mask(paths: Iterable[str]) -> list[FieldViolation]:
    """Return a violation for an empty mask and one for each path UpdateMe cannot change."""
    paths = list(paths)
    allowed = ", ".join(UPDATABLE_FIELDS)
    if not paths:
        return [FieldViolation("update_mask.paths", f"must name at least one of {allowed}: got none")]
    return [
        FieldViolation("update_mask.paths", f"must contain only {allowed}: got {shown(path)}")
        for path in paths
        if path not in UPDATABLE_FIELDS
    ]


def check_profile_changes(changes: Mapping[str, object]) -> list[FieldViolation]:
    """Return the violations of the new profile values, keyed by the updatable field name."""
    violations = []
    for name, value in changes.items():
        if isinstance(value, Mapping):
            violations.extend(FieldViolation(f"user.{name}", problem) for problem in check_preferences(value))
            continue
        problem = _FIELD_CHECKS[name](str(value))
        if problem is not None:
            violations.append(FieldViolation(f"user.{name}", problem))
    return violations


def is_control_character(character: str) -> bool:
    """Return whether a character is a control character or a line or paragraph separator."""
    # Cc covers C0, DEL and C1. Zl and Zp are the Unicode line and paragraph separators.
    return unicodedata.category(character) in ("Cc", "Zl", "Zp")


def _check_no_control_characters(value: str, *, allowed: frozenset[str]) -> str | None:
    for index, character in enumerate(value):
        if character not in allowed and is_control_character(character):
            return f"must not contain control characters: got U+{ord(character):04X} at index {index}"
    return None
