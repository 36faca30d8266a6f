"""The Supabase Storage adapter, through storage3's async client.

Supabase Storage (v1.11, with storage3 2.34) returns most errors as HTTP 400 with the real status
as a string `statusCode` in the JSON body. "404" means a missing object, "409" an existing key,
"413" a body over the bucket's limit and "415" a MIME type that the bucket does not allow.
storage3 raises those as StorageApiError and lets httpx's transport errors through. This adapter
turns every one of them into the port's StorageError subclasses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import httpx
from pydantic import ValidationError
from storage3 import AsyncStorageClient
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException

from app.platform.storage.keys import check_content_type, check_key
from app.platform.storage.local import to_valid_unicode
from app.platform.storage.port import (
    ObjectAlreadyExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectRejected,
    StorageError,
    StorageUnavailable,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10.0
# Cache-Control max-age, in seconds, that Storage serves objects with. Signed URLs still expire on time.
CACHE_CONTROL_SECONDS = "3600"
LIST_PAGE_SIZE = 1000
LIST_CONCURRENCY = 8
# Storage's DELETE takes a bounded list of names per call.
DELETE_BATCH_SIZE = 1000
# statusCode values of the error body that a retry may fix.
_RETRYABLE_STATUS = frozenset({"408", "429", "500", "502", "503", "504", "544"})

Result = TypeVar("Result")


class SupabaseStorage:
    """Objects in one Supabase Storage bucket, with URLs signed by Supabase."""

    def __init__(
        self,
        *,
        url: str,
        service_key: str,
        bucket: str,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        """Connect to the project at `url` (https://<ref>.supabase.co) with its service role key.

        Args:
            timeout_seconds: limit of each call as a whole, and of each connect, read and write.
        """
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"SUPABASE_URL must be an http:// or https:// URL: got {url!r}")
        if not service_key or service_key != service_key.strip():
            raise ValueError("SUPABASE_SERVICE_KEY must be set, without blanks around it")
        self.storage_url = url.rstrip("/") + "/storage/v1/"
        self.bucket_name = bucket
        self.timeout_seconds = timeout_seconds
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_seconds), follow_redirects=False)
        # storage3 sends these headers on every call. The API gateway checks apikey, and Storage the Bearer token.
        headers = {"apikey": service_key, "Authorization": f"Bearer {service_key}"}
        self._client = AsyncStorageClient(self.storage_url, headers, http_client=self._http)
        self._bucket = self._client.from_(bucket)

    @classmethod
    def from_settings(cls, settings) -> SupabaseStorage:
        """Connect with SUPABASE_URL, SUPABASE_SERVICE_KEY and SUPABASE_STORAGE_BUCKET."""
        return cls(url=settings.supabase_url, service_key=settings.supabase_service_key, bucket=settings.supabase_storage_bucket)

    async def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        """Store `data` under `key`, replacing any object there."""
        check_key(key)
        check_content_type(content_type)
        # storage3 would send text/plain;charset=UTF-8 without an explicit type, and it sends
        # x-upsert only on POST, where Storage replaces only for the exact string "true".
        options = {"content-type": content_type, "upsert": "true", "cache-control": CACHE_CONTROL_SECONDS}
        await self._call("put", key, lambda: self._bucket.upload(key, bytes(data), options))
        return ObjectInfo(key=key, size=len(data), content_type=content_type)

    async def get(self, key: str) -> bytes:
        """Return the bytes of the object, or raise ObjectNotFound."""
        check_key(key)
        return await self._call("get", key, lambda: self._bucket.download(key))

    async def info(self, key: str) -> ObjectInfo:
        """Return the size and content type of the object, or raise ObjectNotFound."""
        check_key(key)
        reply = await self._call("info", key, lambda: self._bucket.info(key))
        if not isinstance(reply, dict):
            raise StorageError(f"object info of {key!r} is {type(reply).__name__}, not a JSON object")
        # The info route returns size and content_type, and the object's metadata contains them too.
        metadata = reply.get("metadata") if isinstance(reply.get("metadata"), dict) else {}
        size = reply.get("size", metadata.get("size"))
        content_type = reply.get("content_type") or metadata.get("mimetype")
        if not isinstance(size, int) or not isinstance(content_type, str):
            raise StorageError(f"object info of {key!r} lacks size or content_type: got fields {sorted(reply)}")
        return ObjectInfo(key=key, size=size, content_type=content_type)

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove the objects, ignoring keys with no object."""
        names = [check_key(key) for key in keys]
        for start in range(0, len(names), DELETE_BATCH_SIZE):
            batch = names[start : start + DELETE_BATCH_SIZE]
            await self._call("delete", batch[0], lambda batch=batch: self._bucket.remove(batch))

    async def remove_stale_temporaries(self, older_than_seconds: float) -> int:
        """Return 0: Storage never keeps a partial object of an interrupted upload."""
        return 0

    async def list_keys(self, prefix: str) -> list[str]:
        """Return every key that starts with `prefix` followed by "/", sorted.

        Storage lists one folder level per call, and a name that is both an object and a folder
        may come back as one entry. So every entry is also listed as a folder, which costs one
        call per object and folder below the prefix, LIST_CONCURRENCY at a time.

        NOTE: if Storage matches the prefix with SQL ILIKE (case-insensitive, "_" a wildcard), a
        returned key may belong to a similar prefix and not exist. Deleting it is then a no-op,
        and reading it raises ObjectNotFound. The stand-in in the tests matches exactly.
        """
        check_key(prefix)
        keys: list[str] = []
        limiter = asyncio.Semaphore(LIST_CONCURRENCY)

        async def list_folder(folder: str) -> tuple[str, list[dict]]:
            async with limiter:
                return folder, await self._list_folder(folder)

        level = [prefix]
        while level:
            # return_exceptions lets every call finish before the first failure is raised.
            results = await asyncio.gather(*(list_folder(folder) for folder in level), return_exceptions=True)
            level = []
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                folder, entries = result
                for entry in entries:
                    name = entry.get("name")
                    if not isinstance(name, str) or not name:
                        continue
                    path = f"{folder}/{name}"
                    if entry.get("id") is not None:
                        keys.append(path)
                    level.append(path)
        return sorted(keys)

    async def _list_folder(self, folder: str) -> list[dict]:
        entries: list[dict] = []
        while True:
            options = {"limit": LIST_PAGE_SIZE, "offset": len(entries)}
            page = await self._call("list", folder, lambda options=options: self._bucket.list(folder, options))
            if not isinstance(page, list):
                raise StorageError(f"listing {folder!r} returned {type(page).__name__}, not a list")
            entries.extend(entry for entry in page if isinstance(entry, dict))
            if len(page) < LIST_PAGE_SIZE:
                return entries

    async def signed_download_url(
        self, key: str, *, expires_in_seconds: int, file_name: str, inline: bool
    ) -> str:
        """Return a URL that serves the object without credentials until it expires.

        NOTE: Supabase names the file only for attachments (the `download` query parameter), so an
        inline reply carries no Content-Disposition and the browser derives a name from the URL.
        """
        check_key(key)
        # Storage's GET reads `download` from the URL and replies with an attachment of that name.
        options = None if inline else {"download": to_valid_unicode(file_name) or "download"}
        reply = await self._call("sign", key, lambda: self._bucket.create_signed_url(key, expires_in_seconds, options))
        return _absolute_url(reply.get("signedURL"), key)

    async def signed_upload_url(
        self, key: str, *, expires_in_seconds: int, content_type: str, max_bytes: int
    ) -> str:
        """Return a URL that takes one PUT of the object's bytes while no object exists under the key.

        NOTE: Supabase signs only the path. It does not bind `content_type` or `max_bytes`, because
        only the bucket's own limits apply, and the URL stays valid for two hours whatever
        `expires_in_seconds` is. The caller must check the size and type of what arrived.
        """
        check_key(key)
        check_content_type(content_type)
        # Without upsert, Storage refuses the PUT while an object exists under the key, so the URL
        # cannot replace bytes that were already accepted.
        reply = await self._call("sign upload", key, lambda: self._bucket.create_signed_upload_url(key))
        return _absolute_url(reply.get("signed_url"), key)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def _call(self, operation: str, key: str, request: Callable[[], Awaitable[Result]]) -> Result:
        """Run one storage3 call under the timeout, turning its failures into StorageError subclasses."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await request()
        except StorageApiError as error:
            raise _translate(error, operation, key) from error
        except (TimeoutError, httpx.TimeoutException) as error:
            raise StorageUnavailable(f"Supabase Storage {operation} of {key!r} timed out after {self.timeout_seconds} s") from error
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as error:
            raise StorageUnavailable(f"Supabase Storage {operation} of {key!r} failed: {type(error).__name__}") from error
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            # A request this client could not even send, such as a bad URL or header: no retry helps.
            raise StorageError(f"Supabase Storage {operation} of {key!r} could not be sent: {type(error).__name__}") from error
        except (StorageException, ValidationError, ValueError, KeyError, TypeError) as error:
            raise StorageError(f"Supabase Storage {operation} of {key!r} returned an unexpected reply: {type(error).__name__}") from error


def _translate(error: StorageApiError, operation: str, key: str) -> StorageError:
    """Return the port error for a Storage error body, whose statusCode is a string (the HTTP status is 400)."""
    status = str(error.status)
    code = str(error.code)
    message = f"Supabase Storage {operation} of {key!r} failed: {status} {code}: {error.message}"
    if status == "404":
        # A wrong bucket also comes back as "404", but it is a configuration error, not a missing object.
        if "bucket" in f"{code} {error.message}".lower():
            return StorageError(message)
        return ObjectNotFound(message)
    if status == "409":
        return ObjectAlreadyExists(message)
    if status in ("413", "415"):
        return ObjectRejected(message)
    if status in _RETRYABLE_STATUS or status.startswith("5"):
        return StorageUnavailable(message)
    return StorageError(message)


def _absolute_url(url: object, key: str) -> str:
    # storage3 joins the path that Storage returns to the storage URL, so it is already absolute.
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise StorageError(f"Supabase Storage returned no absolute signed URL for {key!r}: got {url!r}")
    return url
