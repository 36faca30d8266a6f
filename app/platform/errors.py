"""The service's error hierarchy and its one mapping to Connect codes.

    ServiceError
    ├── InvalidInput         invalid_argument, with google.rpc.BadRequest field violations
    ├── NotFound             not_found
    ├── AlreadyExists        already_exists
    ├── Unauthenticated      unauthenticated
    ├── PermissionDenied     permission_denied
    ├── FailedPrecondition   failed_precondition
    ├── Aborted              aborted (a stale etag, a lost race)
    ├── ResourceExhausted    resource_exhausted
    ├── DeadlineExceeded     deadline_exceeded
    └── Unavailable          unavailable (a dependency is down or timed out)

Logic and adapters raise these. `to_connect_error` turns one into a ConnectError carrying
google.rpc.ErrorInfo (reason and request id) and, for invalid input, google.rpc.BadRequest.
Any other exception becomes `internal` with a generic message (see app.platform.interceptors).
"""

from __future__ import annotations

from dataclasses import dataclass

from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from google.protobuf.message import Message as GoogleMessage
from google.rpc import error_details_pb2
from protobuf.wkt import Any as WireAny

ERROR_DOMAIN = "functions"
# Maximum length of the part of a received value that an error message quotes.
SHOWN_VALUE_MAX_LENGTH = 40


def shown(value: str) -> str:
    """Quote a received value for an error message, shortened when long."""
    if len(value) <= SHOWN_VALUE_MAX_LENGTH:
        return repr(value)
    return repr(value[:SHOWN_VALUE_MAX_LENGTH]) + f"... ({len(value)} characters)"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: its path (`user.display_name`) and what is wrong with it."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of every error the service reports to callers on purpose."""

    code = Code.INTERNAL
    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidInput(ServiceError):
    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation, *, reason: str | None = None) -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else list(violations)
        message = "; ".join(f"{v.field} {v.description}" for v in self.violations)
        super().__init__(message, reason=reason)


class NotFound(ServiceError):
    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = Code.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class Unauthenticated(ServiceError):
    code = Code.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = Code.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class FailedPrecondition(ServiceError):
    code = Code.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(ServiceError):
    code = Code.ABORTED
    reason = "ABORTED"


class ResourceExhausted(ServiceError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServiceError):
    code = Code.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Unavailable(ServiceError):
    code = Code.UNAVAILABLE
    reason = "UNAVAILABLE"


def pack_detail(message: GoogleMessage) -> ErrorDetail:
    """Wrap a google.protobuf message as a Connect error detail."""
    type_url = f"type.googleapis.com/{message.DESCRIPTOR.full_name}"
    return ErrorDetail(WireAny(type_url=type_url, value=message.SerializeToString()))


def error_info(reason: str, request_id: str | None) -> ErrorDetail:
    """Build the google.rpc.ErrorInfo detail every error carries."""
    metadata = {"request_id": request_id} if request_id else {}
    return pack_detail(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))


def to_connect_error(error: ServiceError, request_id: str | None) -> ConnectError:
    """Translate a service error into the ConnectError sent to the caller."""
    details = [error_info(error.reason, request_id)]
    if isinstance(error, InvalidInput):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        details.append(pack_detail(bad_request))
    return ConnectError(error.code, error.message, details)


def internal_error(request_id: str | None) -> ConnectError:
    """Build the generic error that replaces an unexpected exception."""
    message = f"internal error; request id {request_id}" if request_id else "internal error"
    return ConnectError(Code.INTERNAL, message, [error_info("INTERNAL", request_id)])
