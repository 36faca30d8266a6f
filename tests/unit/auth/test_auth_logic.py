"""Auth use cases with a fake Firebase: input checks, the own-admin-role rule, custom claims."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.auth import logic
from app.platform.context import Principal
from app.platform.errors import FailedPrecondition, InvalidInput

REVOKE_TIME = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FakeAccounts:
    """Records the calls that would go to Firebase."""

    def __init__(self) -> None:
        self.roles: dict[str, list[str]] = {}
        self.revoked: list[str] = []

    async def set_roles(self, uid: str, roles: list[str]) -> list[str]:
        self.roles[uid] = list(roles)
        return list(roles)

    async def revoke_sessions(self, uid: str) -> datetime:
        self.revoked.append(uid)
        return REVOKE_TIME


ADMIN = Principal(uid="admin-1", roles=("admin",))
MEMBER = Principal(uid="member-1")


def test_describe_caller_keeps_only_custom_claims():
    claims = {
        "iss": "https://securetoken.google.com/p", "aud": "p", "sub": "u1", "user_id": "u1", "iat": 1, "exp": 2,
        "auth_time": 1, "email": "u1@example.com", "email_verified": True, "name": "U", "picture": "https://x",
        "phone_number": "+15550100", "firebase": {"sign_in_provider": "password"},
        "roles": ["editor"], "tier": "gold",
    }
    principal = Principal(
        uid="u1", email="u1@example.com", email_verified=True, roles=("editor",), sign_in_provider="password",
        auth_time=1, issued_at=1, expires_at=2, claims=claims,
    )

    identity = logic.describe_caller(principal)

    assert identity.custom_claims == {"roles": ["editor"], "tier": "gold"}
    assert identity.uid == "u1"
    assert identity.roles == ("editor",)
    assert identity.auth_time == 1
    assert identity.expires_at == 2


async def test_set_roles_stores_roles():
    accounts = FakeAccounts()

    assignment = await logic.set_roles(accounts, ADMIN, "member-1", ["editor", "viewer"])

    assert assignment == logic.RoleAssignment(uid="member-1", roles=("editor", "viewer"))
    assert accounts.roles == {"member-1": ["editor", "viewer"]}


@pytest.mark.parametrize(
    ("roles", "fields"),
    [
        (["Admin"], ["roles[0]"]),
        (["ok", "9lives", "-x"], ["roles[1]", "roles[2]"]),
        ([""], ["roles[0]"]),
        (["editor\n"], ["roles[0]"]),
        (["a" * 32], []),
        (["a" * 33], ["roles[0]"]),
        (["editor", "viewer", "editor", "viewer"], ["roles[2]", "roles[3]"]),
        ([f"role-{index}" for index in range(20)], []),
        ([f"role-{index}" for index in range(21)], ["roles"]),
        ([], []),
    ],
    ids=[
        "upper-case", "bad-starts", "empty", "newline", "32-chars", "33-chars", "duplicates", "20-roles", "21-roles",
        "none",
    ],
)
def test_check_roles(roles, fields):
    violations = logic.check_roles(roles)

    assert [violation.field for violation in violations] == fields


def test_duplicate_role_names_first_index():
    violations = logic.check_roles(["editor", "viewer", "editor"])

    assert violations[0].description == "must not repeat roles[0]: got 'editor'"


def test_long_bad_role_is_shortened_in_message():
    violations = logic.check_roles(["X" * 500])

    assert "(500 characters)" in violations[0].description
    assert len(violations[0].description) < 200


@pytest.mark.parametrize(("uid", "valid"), [("", False), ("u", True), ("u" * 128, True), ("u" * 129, False)])
def test_check_uid(uid, valid):
    assert (logic.check_uid(uid) == []) is valid


async def test_set_roles_reports_every_violation():
    accounts = FakeAccounts()

    with pytest.raises(InvalidInput) as raised:
        await logic.set_roles(accounts, ADMIN, "", ["Bad", "ok", "ok"])

    assert [violation.field for violation in raised.value.violations] == ["uid", "roles[0]", "roles[2]"]
    assert accounts.roles == {}


async def test_admin_cannot_remove_own_admin_role():
    accounts = FakeAccounts()

    with pytest.raises(FailedPrecondition) as raised:
        await logic.set_roles(accounts, ADMIN, ADMIN.uid, ["editor"])

    assert raised.value.reason == "OWN_ADMIN_ROLE"
    assert accounts.roles == {}


async def test_admin_can_change_own_other_roles():
    accounts = FakeAccounts()

    await logic.set_roles(accounts, ADMIN, ADMIN.uid, ["admin", "editor"])

    assert accounts.roles == {ADMIN.uid: ["admin", "editor"]}


async def test_revoke_sessions_without_uid_revokes_caller():
    accounts = FakeAccounts()

    revocation = await logic.revoke_sessions(accounts, MEMBER, "")

    assert revocation == logic.Revocation(uid=MEMBER.uid, revoke_time=REVOKE_TIME)
    assert accounts.revoked == [MEMBER.uid]


async def test_revoke_sessions_of_named_user():
    accounts = FakeAccounts()

    revocation = await logic.revoke_sessions(accounts, ADMIN, "member-2")

    assert revocation.uid == "member-2"
    assert accounts.revoked == ["member-2"]


async def test_revoke_sessions_with_too_long_uid_is_invalid():
    accounts = FakeAccounts()

    with pytest.raises(InvalidInput) as raised:
        await logic.revoke_sessions(accounts, ADMIN, "u" * 129)

    assert [violation.field for violation in raised.value.violations] == ["uid"]
    assert accounts.revoked == []
