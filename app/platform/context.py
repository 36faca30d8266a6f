"""Per-request values carried in contextvars: the request id and the signed-in principal."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from app.platform.errors import Unauthenticated


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller identified by a verified Firebase ID token."""

    uid: str
    email: str = ""
    email_verified: bool = False
    roles: tuple[str, ...] = ()
    sign_in_provider: str = ""
    auth_time: int = 0
    issued_at: int = 0
    expires_at: int = 0
    # Every claim of the token, for handlers that need more than the fields above.
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def has_role(self, role: str) -> bool:
        return role in self.roles

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
principal_var: ContextVar[Principal | None] = ContextVar("principal", default=None)
# The trace id of the current request, for log lines written after its span ended.
trace_id_var: ContextVar[str | None] = ContextVar("trace_id", default=None)
# Why authentication failed, when it did: the policy interceptor reports it only
# for methods that need a signed-in caller, so public methods still reply.
auth_error_var: ContextVar[Exception | None] = ContextVar("auth_error", default=None)


def current_principal() -> Principal | None:
    """Return the signed-in caller of the current request, if any."""
    return principal_var.get()


def require_principal() -> Principal:
    """Return the signed-in caller of the current request, or raise Unauthenticated.

    The policy interceptor rejects calls without a principal before a handler runs. This check
    covers a handler called without that interceptor, as in tests.
    """
    principal = principal_var.get()
    if principal is None:
        raise Unauthenticated("this method requires a signed-in caller: send 'Authorization: Bearer <Firebase ID token>'")
    return principal


def current_request_id() -> str | None:
    """Return the id of the current request."""
    return request_id_var.get()
