"""connectrpc interceptors shared by every service: authorization and error translation."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from functions.options.v1 import options_pb2

from app.platform.context import auth_error_var, current_request_id, principal_var
from app.platform.deadlines import (
    DEFAULT_DEADLINE_SECONDS,
    MAX_DEADLINE_SECONDS,
    DeadlineInterceptor,
)
from app.platform.errors import (
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    internal_error,
    to_connect_error,
)
from app.platform.policy import AccessPolicy, policy_for

log = logging.getLogger(__name__)


def _method_name(ctx: RequestContext) -> str:
    return f"{ctx.method.service_name}/{ctx.method.name}"


class AuthorizationInterceptor:
    """Enforce each method's declared access policy before the request body is read.

    The owner check of ACCESS_SELF_OR_ADMIN needs the request message, so
    OwnerInterceptor does that part once the message is decoded.
    """

    async def on_start(self, ctx: RequestContext) -> None:
        try:
            check_access(ctx)
        except ServiceError as error:
            raise to_connect_error(error, current_request_id()) from None

    async def on_end(self, token: None, ctx: RequestContext, error: Exception | None) -> None:
        return


def check_access(ctx: RequestContext) -> None:
    """Raise Unauthenticated or PermissionDenied unless the caller may call the method."""
    policy = policy_for(ctx.method.service_name, ctx.method.name)
    if policy is None:
        raise PermissionDenied(f"method {_method_name(ctx)} declares no access policy, so it is denied", reason="NO_POLICY")
    if policy.access == options_pb2.ACCESS_PUBLIC:
        return

    auth_error = auth_error_var.get()
    if auth_error is not None:
        raise auth_error
    principal = principal_var.get()
    if principal is None:
        raise Unauthenticated(
            f"method {_method_name(ctx)} requires a signed-in caller: send 'Authorization: Bearer <Firebase ID token>'",
            reason="MISSING_TOKEN",
        )

    if policy.access == options_pb2.ACCESS_ROLE and not any(principal.has_role(role) for role in policy.roles):
        raise PermissionDenied(
            f"method {_method_name(ctx)} requires one of the roles {list(policy.roles)}", reason="MISSING_ROLE"
        )


def check_owner(policy: AccessPolicy, request: Any, ctx: RequestContext) -> None:
    """Raise PermissionDenied unless the request's owner field names the caller or the caller is an admin."""
    if policy.access != options_pb2.ACCESS_SELF_OR_ADMIN:
        return
    principal = principal_var.get()
    owner = getattr(request, policy.owner_field, "") if policy.owner_field else ""
    if principal is None or not owner or owner == principal.uid or principal.is_admin:
        return
    # The message names neither user, so it reveals nothing about the other account.
    raise PermissionDenied(
        f"method {_method_name(ctx)} is limited to the caller's own {policy.owner_field} unless the caller is an admin",
        reason="NOT_OWNER",
    )


def _translate(error: Exception, ctx: RequestContext) -> ConnectError:
    request_id = current_request_id()
    if isinstance(error, ServiceError):
        return to_connect_error(error, request_id)
    log.error(
        "unexpected error in %s; request id %s", _method_name(ctx), request_id, exc_info=error,
        extra={"rpc_method": _method_name(ctx)},
    )
    return internal_error(request_id)


class ErrorInterceptor:
    """Check resource ownership, then turn service errors into Connect errors and hide unexpected ones.

    An unexpected exception reaches the caller as `internal` with the request id
    only; its traceback is logged here, once.
    """

    async def intercept_unary(
        self, call_next: Callable[[Any, RequestContext], Awaitable[Any]], request: Any, ctx: RequestContext
    ) -> Any:
        try:
            self._check_owner(request, ctx)
            return await call_next(request, ctx)
        except ConnectError:
            raise
        except Exception as error:
            raise _translate(error, ctx) from None

    async def intercept_server_stream(
        self, call_next: Callable[[Any, RequestContext], AsyncIterator[Any]], request: Any, ctx: RequestContext
    ) -> AsyncIterator[Any]:
        try:
            self._check_owner(request, ctx)
            async for message in call_next(request, ctx):
                yield message
        except ConnectError:
            raise
        except Exception as error:
            raise _translate(error, ctx) from None

    async def intercept_client_stream(
        self, call_next: Callable[[AsyncIterator[Any], RequestContext], Awaitable[Any]], request: AsyncIterator[Any],
        ctx: RequestContext,
    ) -> Any:
        try:
            return await call_next(request, ctx)
        except ConnectError:
            raise
        except Exception as error:
            raise _translate(error, ctx) from None

    async def intercept_bidi_stream(
        self, call_next: Callable[[AsyncIterator[Any], RequestContext], AsyncIterator[Any]],
        request: AsyncIterator[Any], ctx: RequestContext,
    ) -> AsyncIterator[Any]:
        try:
            async for message in call_next(request, ctx):
                yield message
        except ConnectError:
            raise
        except Exception as error:
            raise _translate(error, ctx) from None

    @staticmethod
    def _check_owner(request: Any, ctx: RequestContext) -> None:
        policy = policy_for(ctx.method.service_name, ctx.method.name)
        if policy is not None:
            check_owner(policy, request, ctx)


def service_interceptors(
    default_deadline_seconds: float = DEFAULT_DEADLINE_SECONDS, max_deadline_seconds: float = MAX_DEADLINE_SECONDS
) -> list:
    """Return the interceptors every service application runs, outermost first."""
    # Authorization stays first: connectrpc runs leading metadata interceptors before reading the body.
    return [
        AuthorizationInterceptor(),
        DeadlineInterceptor(default_deadline_seconds, max_deadline_seconds),
        ErrorInterceptor(),
    ]
