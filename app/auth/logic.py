"""Use cases of the auth domain: describe the caller, set a user's roles, revoke a user's sessions.

Roles live in the `roles` custom claim of the Firebase user, so a change reaches the user's next
ID token, after the client refreshes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from app.platform.context import Principal
from app.platform.errors import FailedPrecondition, FieldViolation, InvalidInput, shown

MAX_ROLES = 20
ROLE_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_UID_CHARS = 128
ADMIN_ROLE = "admin"

# Claims that the JWT standard or Firebase define, so they are not the project's custom claims.
REGISTERED_CLAIMS = frozenset(
    {
        "iss",
        "aud",
        "sub",
        "iat",
        "exp",
        "auth_time",
        "user_id",
        "firebase",
        "email",
        "email_verified",
        "name",
        "picture",
        "phone_number",
    }
)


class UserAccounts(Protocol):
    """The Firebase user administration that the use cases need (FirebaseAdmin in the service)."""

    async def set_roles(self, uid: str, roles: list[str]) -> list[str]: ...

    async def revoke_sessions(self, uid: str) -> datetime: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller's identity, from the claims of their verified ID token."""

    uid: str
    email: str
    email_verified: bool
    roles: tuple[str, ...]
    sign_in_provider: str
    # Seconds since the epoch.
    auth_time: int
    expires_at: int
    custom_claims: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RoleAssignment:
    """The roles a user has after SetRoles."""

    uid: str
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revocation of a user's sessions: ID tokens authenticated before revoke_time are rejected."""

    uid: str
    revoke_time: datetime


def describe_caller(principal: Principal) -> Identity:
    """Describe the caller from the claims of their ID token."""
    custom_claims = {name: value for name, value in principal.claims.items() if name not in REGISTERED_CLAIMS}
    return Identity(
        uid=principal.uid,
        email=principal.email,
        email_verified=principal.email_verified,
        roles=principal.roles,
        sign_in_provider=principal.sign_in_provider,
        auth_time=principal.auth_time,
        expires_at=principal.expires_at,
        custom_claims=custom_claims,
    )


async def set_roles(accounts: UserAccounts, admin: Principal, uid: str, roles: list[str]) -> RoleAssignment:
    """Replace the roles of a user.

    An admin cannot remove their own admin role. Another admin has to do it, so that the last
    admin cannot lock everybody out of SetRoles by accident.

    Raises:
        InvalidInput: when the uid or a role is invalid.
        FailedPrecondition: when an admin would remove their own admin role.
        NotFound: when no user has this uid.
    """
    violations = [*check_uid(uid), *check_roles(roles)]
    if violations:
        raise InvalidInput(violations)
    if uid == admin.uid and ADMIN_ROLE not in roles:
        raise FailedPrecondition(
            f"an admin cannot remove their own {ADMIN_ROLE} role: another admin has to do it",
            reason="OWN_ADMIN_ROLE",
        )

    stored = await accounts.set_roles(uid, list(roles))

    return RoleAssignment(uid=uid, roles=tuple(stored))


async def revoke_sessions(accounts: UserAccounts, principal: Principal, uid: str) -> Revocation:
    """Revoke every session of a user; an empty uid means the caller.

    The access policy has already checked that the caller is this user or an admin.

    Raises:
        InvalidInput: when the uid is longer than Firebase allows.
        NotFound: when no user has this uid.
    """
    target = uid or principal.uid
    violations = check_uid(target)
    if violations:
        raise InvalidInput(violations)

    revoke_time = await accounts.revoke_sessions(target)

    return Revocation(uid=target, revoke_time=revoke_time)


def check_uid(uid: str) -> list[FieldViolation]:
    """Return the violation of a Firebase uid, which is 1 to 128 characters."""
    if not 1 <= len(uid) <= MAX_UID_CHARS:
        return [FieldViolation("uid", f"must be 1 to {MAX_UID_CHARS} characters: got {len(uid)} characters")]
    return []


def check_roles(roles: list[str]) -> list[FieldViolation]:
    """Return the violations of a list of roles: too many, badly formed, or repeated."""
    if len(roles) > MAX_ROLES:
        return [FieldViolation("roles", f"must contain at most {MAX_ROLES} roles: got {len(roles)}")]

    violations = []
    first_index: dict[str, int] = {}
    for index, role in enumerate(roles):
        name = f"roles[{index}]"
        if ROLE_PATTERN.fullmatch(role) is None:
            violations.append(
                FieldViolation(
                    name,
                    f"must match {ROLE_PATTERN.pattern} (a lower-case letter, then up to 31 lower-case letters, "
                    f"digits, '_' or '-'): got {shown(role)}",
                )
            )
        elif role in first_index:
            violations.append(FieldViolation(name, f"must not repeat roles[{first_index[role]}]: got {shown(role)}"))
        else:
            first_index[role] = index
    return violations