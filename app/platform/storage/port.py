"""The storage port: what the files domain needs from a place that keeps bytes.

Keys are chosen by the server (`<uid>/<file id>` and derived keys below it), never by users.
Adapters raise the StorageError subclasses below and nothing else, so the files domain can map
every storage failure to a Connect code. An adapter's own exceptions never reach a caller.
A key that breaks the key rules of app.platform.storage.keys raises InvalidKey, a StorageError
that is also a ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """The size and content type the store records for one object."""

    key: str
    size: int
    content_type: str


class StorageError(Exception):
    """Base of every failure an adapter reports. The message is for logs, not for callers."""


class ObjectNotFound(StorageError):
    """No object has the key."""


class ObjectAlreadyExists(StorageError):
    """An object has the key and the call does not replace objects."""


class ObjectRejected(StorageError):
    """The store refused the object, for its type or its size."""


class StorageUnavailable(StorageError):
    """The store did not reply, replied too late, or failed in a way a retry may fix."""


class ObjectStorage(Protocol):
    """A place that keeps objects under keys and hands out expiring URLs to them."""

    async def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        """Store `data` under `key`, replacing any object there."""
        ...

    async def get(self, key: str) -> bytes:
        """Return the bytes of the object, or raise ObjectNotFound."""
        ...

    async def info(self, key: str) -> ObjectInfo:
        """Return the size and content type of the object, or raise ObjectNotFound."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove the objects; keys with no object are ignored."""
        ...

    async def list_keys(self, prefix: str) -> list[str]:
        """Return every key that starts with `prefix` followed by "/", sorted."""
        ...

    async def remove_stale_temporaries(self, older_than_seconds: float) -> int:
        """Delete partial objects that interrupted writes left, older than the cutoff; return how many.

        Stores that never leave partial objects behind return 0.
        """
        ...

    async def signed_download_url(
        self, key: str, *, expires_in_seconds: int, file_name: str, inline: bool
    ) -> str:
        """Return an absolute URL that serves the object without credentials until it expires.

        The reply names `file_name` in Content-Disposition, inline or as an attachment. Raises
        ObjectNotFound when no object has the key.
        """
        ...

    async def signed_upload_url(
        self, key: str, *, expires_in_seconds: int, content_type: str, max_bytes: int
    ) -> str:
        """Return an absolute URL that takes one PUT of the object's bytes until it expires.

        The PUT sends the bytes as the body with `content_type` as its Content-Type. It fails
        while an object exists under the key, so the URL cannot replace bytes that were already
        uploaded and accepted. Once they are deleted, the URL works again.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and files the adapter holds."""
        ...
