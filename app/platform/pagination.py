"""Opaque page tokens of List RPCs.

A token is a version prefix and the base64url JSON of where the next page starts and of the
request's filters, so a token only continues a listing with the same filters. Callers check
the position's type themselves.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from app.platform.errors import FieldViolation, InvalidInput, shown

# Version prefix, so the token format can change without misreading old tokens.
PAGE_TOKEN_PREFIX = "v1."


def encode_page_token(position: object, filters: Sequence[object]) -> str:
    """Build the token of the page that starts at `position`, for a request with `filters`."""
    payload = json.dumps([position, *filters], separators=(",", ":")).encode()
    return PAGE_TOKEN_PREFIX + base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


def decode_page_token(page_token: str, filters: Sequence[object], *, method: str, filter_names: str) -> object:
    """Return the position of a token that `method` issued for a request with the same `filters`.

    Raise InvalidInput naming `page_token` when the token is not one `method` issued, or when it
    was issued for other filters (`filter_names` names them in the message).
    """
    invalid = InvalidInput(FieldViolation("page_token", f"must be a next_page_token returned by {method}: got {shown(page_token)}"))
    if not page_token.startswith(PAGE_TOKEN_PREFIX):
        raise invalid
    encoded = page_token.removeprefix(PAGE_TOKEN_PREFIX)
    try:
        payload = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
        values = json.loads(payload)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise invalid from None
    if not isinstance(values, list) or len(values) != len(filters) + 1:
        raise invalid

    position, *token_filters = values
    if [type(value) for value in token_filters] != [type(value) for value in filters]:
        raise invalid
    if token_filters != list(filters):
        issued_for = ", ".join(shown(value) if isinstance(value, str) else repr(value) for value in token_filters)
        raise InvalidInput(
            FieldViolation("page_token", f"must come from a request with the same {filter_names}: got a token for {issued_for}")
        )
    return position
