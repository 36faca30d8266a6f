"""Use cases of user profiles: read, create on first sight, update, list and delete.

Every function but `disable_sign_in` works inside the caller's unit of work: it takes the session,
never commits, and raises ServiceError subclasses for callers to see.

A deleted profile stays as a tombstone. Its uid cannot sign in to this domain again: the
functions that act for a caller raise Unauthenticated with reason ACCOUNT_DELETED for it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from functions.events.v1 import events_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy.ext.asyncio import AsyncSession

from app.platform import pagination
from app.platform.context import Principal
from app.platform.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from app.platform.events import record_event
from app.platform.firebase import FirebaseAdmin
from app.users import store
from app.users.access import announce_deletion
from app.users.model import (
    DISPLAY_NAME_MAX_LENGTH,
    EMAIL_MAX_LENGTH,
    UID_MAX_LENGTH,
    UserProfile,
)
from app.users.validation import (
    check_lookup_text,
    check_photo_url,
    check_profile_changes,
    check_update_mask,
    is_control_character,
    shown,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
# An update without an etag is retried on a fresh read this many times when a concurrent
# update wins, because the caller asked for last-writer-wins.
MAX_UPDATE_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True, slots=True)
class ProfilePage:
    """One page of ListUsers: the profiles and the token of the next page, empty on the last."""

    profiles: list[UserProfile]
    next_page_token: str


async def get_or_create_profile(session: AsyncSession, principal: Principal, *, now: datetime | None = None) -> UserProfile:
    """Return the caller's profile, creating it from the ID token's claims on first sight.

    Concurrent first calls of one caller create one row, and every call returns that row.
    Creating the profile records a UserCreated event in the same transaction. Raise
    Unauthenticated (ACCOUNT_DELETED) when the caller deleted their account.
    """
    profile = await _find_or_create_profile(session, principal, now)
    if profile.is_deleted:
        raise _account_deleted(principal.uid)
    return profile


async def get_profile(session: AsyncSession, uid: str, *, caller: Principal | None = None) -> UserProfile:
    """Return the profile of `uid`, or raise NotFound when that user has none or deleted it.

    With `caller`, a caller who deleted their account gets Unauthenticated (ACCOUNT_DELETED),
    whichever profile they ask for.
    """
    if len(uid) > UID_MAX_LENGTH:
        raise InvalidInput(FieldViolation("uid", f"must be at most {UID_MAX_LENGTH} characters: got {len(uid)}"))
    if (problem := check_lookup_text(uid)) is not None:
        raise InvalidInput(FieldViolation("uid", problem))

    if caller is not None and caller.uid != uid:
        await reject_deleted_caller(session, caller)
    profile = await store.find_user(session, uid)

    if profile is not None and profile.is_deleted and caller is not None and caller.uid == uid:
        raise _account_deleted(uid)
    if profile is None or profile.is_deleted:
        raise NotFound(f"user {uid} not found")
    return profile


async def delete_profile(
    session: AsyncSession, principal: Principal, etag: str = "", *, now: datetime | None = None
) -> UserProfile:
    """Mark the caller's profile deleted, clear its fields and record a UserDeleted event.

    Every field but the uid, version and times is cleared, and the row stays as a tombstone. A
    caller without a profile gets one created and deleted, so consumers see UserCreated before
    UserDeleted. When `etag` is set, the deletion fails with Aborted unless the stored profile
    still has that etag. Deleting a deleted profile changes nothing and returns it with its
    first delete_time.
    """
    for attempt in range(1, MAX_UPDATE_ATTEMPTS + 1):
        current = await _find_or_create_profile(session, principal, now)
        if current.is_deleted:
            # The etag is not compared, because a retry of a deletion that succeeded sends the
            # etag from before the deletion and must get the same reply.
            return current
        if etag and etag != current.etag:
            raise _modified_since(current.uid, etag)

        delete_time = now or datetime.now(UTC)
        deleted = dataclasses.replace(
            current,
            email="",
            display_name="",
            photo_url="",
            locale="",
            time_zone="",
            bio="",
            preferences={},
            version=current.version + 1,
            update_time=delete_time,
            delete_time=delete_time,
        )
        if await store.update_user(session, deleted, expected_version=current.version):
            await record_event(session, events_pb2.UserDeleted(uid=deleted.uid))
            await announce_deletion(session, deleted.uid)
            log.info("deleted user profile", extra={"uid": deleted.uid})
            return deleted
        if etag:
            raise _modified_since(current.uid, etag)
        log.warning("user profile changed during a deletion; retrying", extra={"uid": current.uid, "attempt": attempt})

    raise Aborted(
        f"deletion of user {principal.uid} failed {MAX_UPDATE_ATTEMPTS} times because of concurrent updates: retry later"
    )


async def disable_sign_in(firebase: FirebaseAdmin | None, uid: str) -> None:
    """Disable the Firebase user of a deleted profile, so Firebase refuses their sign-ins and token refreshes.

    Call it after the deletion commits. When it fails, the deletion stays committed and the
    error message states that. Where users sign in with Firebase, the UserDeleted consumer of
    app.users.events retries until it succeeds.

    Raises:
        FailedPrecondition: when this server has no Firebase Admin or no credentials for it.
        Unavailable: when Firebase Auth fails or does not respond in time.
    """
    if firebase is None:
        raise FailedPrecondition(
            f"user {uid} is deleted, but its Firebase account is not disabled: this server has no Firebase Admin",
            reason="FIREBASE_NOT_CONFIGURED",
        )

    try:
        await firebase.disable_user(uid)
    except NotFound:
        # A uid without a Firebase user has no account to sign in to, as with development tokens.
        log.info("deleted user has no Firebase account to disable", extra={"uid": uid})
    except (FailedPrecondition, Unavailable) as error:
        raise type(error)(
            f"user {uid} is deleted, but its Firebase account is not disabled: {error.message}",
            reason=error.reason,
        ) from error


async def reject_deleted_caller(session: AsyncSession, principal: Principal) -> None:
    """Raise Unauthenticated (ACCOUNT_DELETED) when the caller deleted their account."""
    if await store.find_delete_time(session, principal.uid) is not None:
        raise _account_deleted(principal.uid)


async def update_profile(
    session: AsyncSession,
    principal: Principal,
    values: Mapping[str, object],
    update_mask: Sequence[str],
    etag: str = "",
    *,
    now: datetime | None = None,
) -> UserProfile:
    """Update the caller's profile fields named in `update_mask` with the matching `values`.

    A named field that is empty or missing in `values` is cleared. When `etag` is set, the update fails with
    Aborted unless the stored profile still has that etag. The update records a UserUpdated event
    in the same transaction.
    """
    mask_violations = check_update_mask(update_mask)
    if mask_violations:
        raise InvalidInput(mask_violations)
    changes = {path: _copied(values.get(path, {} if path == "preferences" else "")) for path in dict.fromkeys(update_mask)}
    value_violations = check_profile_changes(changes)
    if value_violations:
        raise InvalidInput(value_violations)

    for attempt in range(1, MAX_UPDATE_ATTEMPTS + 1):
        current = await get_or_create_profile(session, principal, now=now)
        if etag and etag != current.etag:
            raise _modified_since(current.uid, etag)

        updated = dataclasses.replace(
            current, **changes, version=current.version + 1, update_time=now or datetime.now(UTC)
        )
        if await store.update_user(session, updated, expected_version=current.version):
            changed_fields = [path for path in changes if getattr(current, path) != getattr(updated, path)]
            await record_event(
                session,
                events_pb2.UserUpdated(
                    uid=updated.uid, changed_fields=FieldMask(paths=changed_fields), version=updated.version
                ),
            )
            return updated
        if etag:
            raise _modified_since(current.uid, etag)
        log.warning("user profile changed during an update; retrying", extra={"uid": current.uid, "attempt": attempt})

    raise Aborted(
        f"update of user {principal.uid} failed {MAX_UPDATE_ATTEMPTS} times because of concurrent updates: retry later"
    )


async def list_profiles(
    session: AsyncSession, page_size: int, page_token: str, email_prefix: str, *, caller: Principal | None = None
) -> ProfilePage:
    """List profiles that are not deleted ordered by uid, optionally only those whose email starts with `email_prefix`.

    `page_size` 0 means 50 and values above 100 are capped at 100. `email_prefix` is compared
    case-insensitively. `page_token` must come from a request with the same `email_prefix`.
    With `caller`, a caller who deleted their account gets Unauthenticated (ACCOUNT_DELETED).
    """
    violations = []
    if page_size < 0:
        violations.append(FieldViolation("page_size", f"must not be negative: got {page_size}"))
    if len(email_prefix) > EMAIL_MAX_LENGTH:
        violations.append(
            FieldViolation("email_prefix", f"must be at most {EMAIL_MAX_LENGTH} characters: got {len(email_prefix)}")
        )
    if (problem := check_lookup_text(email_prefix)) is not None:
        violations.append(FieldViolation("email_prefix", problem))
    if violations:
        raise InvalidInput(violations)

    if caller is not None:
        await reject_deleted_caller(session, caller)

    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    prefix = email_prefix.lower()
    after_uid = decode_page_token(page_token, prefix) if page_token else ""

    # Fetching one extra row shows whether another page follows.
    profiles = await store.list_users(session, limit=limit + 1, after_uid=after_uid, email_prefix=prefix)
    if len(profiles) <= limit:
        return ProfilePage(profiles=profiles, next_page_token="")
    page = profiles[:limit]
    return ProfilePage(profiles=page, next_page_token=encode_page_token(page[-1].uid, prefix))


def profile_from_principal(principal: Principal, now: datetime) -> UserProfile:
    """Build a new profile from the ID token: email, `name` as display name, `picture` as photo.

    Claims that break a profile rule are shortened or dropped instead of failing, because
    the caller did not choose them and GetMe must not fail on them.
    """
    name = principal.claims.get("name")
    picture = principal.claims.get("picture")
    email = principal.email.lower()
    return UserProfile(
        uid=principal.uid,
        email=email if len(email) <= EMAIL_MAX_LENGTH else "",
        display_name=_display_name_from_claim(name),
        photo_url=picture if isinstance(picture, str) and check_photo_url(picture) is None else "",
        locale="",
        time_zone="",
        bio="",
        create_time=now,
        update_time=now,
    )


async def _find_or_create_profile(session: AsyncSession, principal: Principal, now: datetime | None) -> UserProfile:
    """Return the caller's profile, deleted or not, creating it on first sight."""
    profile = await store.find_user(session, principal.uid)
    if profile is not None:
        return profile

    new_profile = profile_from_principal(principal, now or datetime.now(UTC))
    if await store.add_user(session, new_profile):
        log.info("created user profile", extra={"uid": principal.uid})
        await record_event(session, events_pb2.UserCreated(uid=principal.uid))
    return await store.get_user(session, principal.uid)


def _account_deleted(uid: str) -> Unauthenticated:
    return Unauthenticated(f"account of user {uid} was deleted: sign in with another account", reason="ACCOUNT_DELETED")


def _modified_since(uid: str, etag: str) -> Aborted:
    return Aborted(f"user {uid} was modified since etag {shown(etag)}; read it again and retry")


def _display_name_from_claim(name: object) -> str:
    if not isinstance(name, str):
        return ""
    cleaned = "".join(character for character in name if not is_control_character(character))
    return cleaned.strip()[:DISPLAY_NAME_MAX_LENGTH]


def _copied(value: object) -> object:
    # A protobuf map or any other mapping becomes a plain dict the profile owns.
    return dict(value) if isinstance(value, Mapping) else value


def encode_page_token(after_uid: str, email_prefix: str) -> str:
    """Build the opaque token of the page after `after_uid` for the same email prefix."""
    return pagination.encode_page_token(after_uid, [email_prefix])


def decode_page_token(page_token: str, email_prefix: str) -> str:
    """Decode a page token into the uid its page starts after.

    Raise InvalidInput when list_profiles did not issue the token or issued it for another prefix.
    """
    after_uid = pagination.decode_page_token(page_token, [email_prefix], method="ListUsers", filter_names="email_prefix")
    if not isinstance(after_uid, str) or not 0 < len(after_uid) <= UID_MAX_LENGTH or check_lookup_text(after_uid) is not None:
        raise InvalidInput(FieldViolation("page_token", f"must be a next_page_token returned by ListUsers: got {shown(page_token)}"))
    return after_uid
