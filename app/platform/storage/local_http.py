"""The HTTP endpoints behind the local adapter's signed URLs.

    GET|HEAD /storage/v1/local/<key>?expires=&name=&disposition=&signature=
    PUT      /storage/v1/local/<key>?expires=&content_type=&max_bytes=&signature=

The signature is the credential, so these routes need no Authorization header. A failure gets a
small JSON body such as {"error": "expired"} and never a stack trace. The statuses:

    400  invalid key, or a body that ended early
    403  missing, invalid or expired signature
    404  no object
    408  no body bytes for BODY_IDLE_TIMEOUT_SECONDS, or the body did not finish within the
         upload's time limit (see transfer_time_limit) or before the signed URL expired
    409  an object, or another upload in progress, already uses the key
    410  the upload gate no longer accepts the key
    413  body over max_bytes
    415  Content-Type other than the signed one
    416  unsatisfiable Range
    503  (with Retry-After) MAX_CONCURRENT_TRANSFERS in progress, MAX_TRANSFERS_PER_OWNER in
         progress for the owner of the key, or a failed disk or upload gate, which is logged
    500  anything unexpected, logged
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.platform.storage.keys import InvalidKey, check_key, same_content_type
from app.platform.storage.local import (
    COPY_CHUNK_BYTES,
    HEADER_BYTES,
    URL_PATH_PREFIX,
    LocalStorage,
    StoredObject,
    download_fields,
    upload_fields,
)
from app.platform.storage.port import ObjectNotFound, StorageUnavailable
from app.platform.storage.signing import is_valid_signature

log = logging.getLogger(__name__)

# Uploads and downloads in progress at once in this process. Each keeps a socket and an open file
# busy, so past this the routes reply 503 at once rather than queue. Read on every request, so
# tests can change it.
MAX_CONCURRENT_TRANSFERS = 64
# An upload that sends no body bytes for this long gets 408, and a download whose client takes
# no bytes for this long is abandoned, so a stalled client cannot hold a transfer slot forever.
BODY_IDLE_TIMEOUT_SECONDS = 15.0
# Transfers in progress at once for the keys of one owner, the first segment of a key
# ("<uid>/<file id>"), so that one user's slow transfers leave the other slots to other users.
MAX_TRANSFERS_PER_OWNER = 4
# A transfer must end within max(MIN_TRANSFER_SECONDS, bytes / MIN_TRANSFER_BYTES_PER_SECOND),
# counting the signed max_bytes of an upload and the bytes sent by a download. Without this, a
# client that sends or reads one byte just inside BODY_IDLE_TIMEOUT_SECONDS keeps its slot
# for as long as it likes. A 10 MiB transfer gets 160 seconds.
MIN_TRANSFER_SECONDS = 30.0
MIN_TRANSFER_BYTES_PER_SECOND = 64 * 1024
RETRY_AFTER_SECONDS = 1
# Range positions with more digits than this (after leading zeros) are past the end of any file.
MAX_RANGE_DIGITS = 18

# File names longer than this are shortened, keeping the extension, so the header stays small.
MAX_FILE_NAME_CHARACTERS = 200
MAX_EXTENSION_CHARACTERS = 16
# Characters that RFC 5987 allows unencoded in an ext-value (attr-char), beside letters and digits.
_ATTR_CHARS = "!#$&+-.^_`|~"
# Characters dropped from file names. Format characters (Cf) include the bidirectional controls,
# which can disguise an extension ("evil\u202egnp.exe" displays as "evilexe.png"), and zero-width
# characters, which make two names look equal. Private-use and unassigned code points have no
# agreed glyph, and line and paragraph separators break lines in some viewers.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Letters and symbols that render as blank space, and the combining grapheme joiner, which is
# invisible. Other space separators become a plain space.
_INVISIBLE_CHARACTERS = frozenset("\u034f\u115f\u1160\u2800\u3164\uffa0")
_RANGE_POSITION = re.compile(r"[0-9]*")


class UnsatisfiableRange(Exception):
    """The Range header names no byte of the object."""


class ClientTooSlow(Exception):
    """The client of a download took no bytes for BODY_IDLE_TIMEOUT_SECONDS, or not all of them in time."""


def transfer_time_limit(size: int) -> float:
    """Return the seconds that a transfer of `size` bytes may take from its start to its last byte."""
    return max(MIN_TRANSFER_SECONDS, size / MIN_TRANSFER_BYTES_PER_SECOND)


def key_owner(key: str) -> str:
    """Return the owner of a storage key: its first segment."""
    return key.partition("/")[0]


class TransferSlots:
    """The transfers in progress, in total and per owner, and the keys being uploaded.

    One instance is shared by every request. A plain lock, never held across an await, so it
    works whichever thread and event loop serve the routes (tests serve them on a thread of
    their own).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_progress = 0
        self._per_owner: Counter[str] = Counter()
        self._uploading: set[str] = set()

    def acquire(self, owner: str) -> str | None:
        """Take a slot for a transfer of `owner`'s key and return None, or return why none is free.

        The reason is the message of the 503 reply.
        """
        with self._lock:
            if self._per_owner[owner] >= MAX_TRANSFERS_PER_OWNER:
                return (
                    f"too many transfers in progress for the owner of this key: at most {MAX_TRANSFERS_PER_OWNER}, "
                    "try again once one has finished"
                )
            if self._in_progress >= MAX_CONCURRENT_TRANSFERS:
                return f"too many transfers in progress: at most {MAX_CONCURRENT_TRANSFERS}, try again later"
            self._in_progress += 1
            self._per_owner[owner] += 1
            return None

    def release(self, owner: str) -> None:
        """Give back a slot that acquire took for `owner`."""
        with self._lock:
            self._in_progress -= 1
            self._per_owner[owner] -= 1
            if self._per_owner[owner] <= 0:
                del self._per_owner[owner]

    def claim_key(self, key: str) -> bool:
        """Mark `key` as being uploaded and return True, or return False when it already is."""
        with self._lock:
            if key in self._uploading:
                return False
            self._uploading.add(key)
            return True

    def release_key(self, key: str) -> None:
        """End the upload of `key` that claim_key started."""
        with self._lock:
            self._uploading.discard(key)


def signed_url_routes(storage: LocalStorage) -> list[Route]:
    """Return the route that serves downloads (GET, HEAD) and uploads (PUT) of signed URLs."""
    slots = TransferSlots()

    async def endpoint(request: Request) -> Response:
        try:
            if request.method == "PUT":
                return await _upload(storage, slots, request)
            return await _download(storage, slots, request)
        except (OSError, StorageUnavailable) as error:
            log.error("local storage failed", extra={"method": request.method, "error": repr(error)})
            return _unavailable("storage unavailable")
        except Exception:
            log.exception("signed URL request failed", extra={"method": request.method})
            return _error(500, "internal error")

    return [Route(URL_PATH_PREFIX + "{key:path}", endpoint, methods=["GET", "HEAD", "PUT"])]


async def _download(storage: LocalStorage, slots: TransferSlots, request: Request) -> Response:
    key = request.path_params["key"]
    params = request.query_params
    try:
        check_key(key)
    except InvalidKey:
        return _error(400, "invalid key")
    if not all(params.get(name) for name in ("expires", "disposition", "signature")) or "name" not in params:
        return _error(403, "missing signature")

    expires = _int_or_none(params["expires"])
    disposition = params["disposition"]
    fields = download_fields(key, expires if expires is not None else -1, params["name"], disposition)
    if expires is None or not is_valid_signature(storage.signing_key, fields, params["signature"]):
        return _error(403, "invalid signature")
    remaining = expires - int(time.time())
    if remaining < 0:
        return _error(403, "expired")

    owner = key_owner(key)
    if (busy := slots.acquire(owner)) is not None:
        return _unavailable(busy)
    # The slot passes to the streamed reply, which releases it when the reply ends.
    handed_over = False
    try:
        try:
            stored = await asyncio.to_thread(storage.open_object, key)
        except ObjectNotFound:
            return _error(404, "not found")
        try:
            response = _object_response(request, stored, params["name"], disposition == "inline", remaining)
        except BaseException:
            stored.file.close()
            raise
        if isinstance(response, ObjectStreamResponse):
            response.on_close = lambda: slots.release(owner)
            handed_over = True
        return response
    finally:
        if not handed_over:
            slots.release(owner)


def _object_response(request: Request, stored: StoredObject, file_name: str, inline: bool, max_age: int) -> Response:
    size = stored.info.size
    etag = f'"{stored.sha256[:32]}"'
    headers = {
        "accept-ranges": "bytes",
        "content-type": stored.info.content_type,
        "x-content-type-options": "nosniff",
        "content-disposition": content_disposition(file_name, inline=inline),
        "cache-control": f"private, max-age={max_age}",
        "etag": etag,
    }

    if etag in _etags(request.headers.get("if-none-match", "")):
        stored.file.close()
        return Response(status_code=304, headers=headers)

    start, end, status = 0, size - 1, 200
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header is not None and (if_range is None or if_range == etag):
        try:
            byte_range = parse_range(range_header, size)
        except UnsatisfiableRange:
            stored.file.close()
            return _error(416, "range not satisfiable", headers={"content-range": f"bytes */{size}"})
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["content-range"] = f"bytes {start}-{end}/{size}"

    length = end - start + 1
    headers["content-length"] = str(length)
    if request.method == "HEAD":
        stored.file.close()
        return Response(status_code=status, headers=headers)
    return ObjectStreamResponse(stored, start, length, status_code=status, headers=headers)


class ObjectStreamResponse(StreamingResponse):
    """A reply that streams part of an open object file and closes the file when the reply ends.

    The file is opened before the reply starts, so a concurrent put() cannot mix two versions,
    and it is closed even when the client leaves before the first chunk. A send that waits more
    than BODY_IDLE_TIMEOUT_SECONDS for the client ends the reply, and so does a send still
    waiting when transfer_time_limit(length) has passed since the reply started.
    """

    def __init__(self, stored: StoredObject, start: int, length: int, **options) -> None:
        super().__init__(_file_chunks(stored, start, length), **options)
        self.stored = stored
        self.length = length
        self.on_close = lambda: None

    async def __call__(self, scope, receive, send) -> None:
        time_limit = transfer_time_limit(self.length)
        deadline = time.monotonic() + time_limit

        async def send_in_time(message) -> None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientTooSlow(f"the client did not take all bytes within {time_limit:g} seconds")
            try:
                await asyncio.wait_for(send(message), min(BODY_IDLE_TIMEOUT_SECONDS, remaining))
            except TimeoutError as error:
                # Starlette 1.10 turns OSError, and so TimeoutError, into ClientDisconnect.
                if remaining < BODY_IDLE_TIMEOUT_SECONDS:
                    raise ClientTooSlow(f"the client did not take all bytes within {time_limit:g} seconds") from error
                raise ClientTooSlow(f"the client took no bytes for {BODY_IDLE_TIMEOUT_SECONDS:g} seconds") from error

        try:
            await super().__call__(scope, receive, send_in_time)
        except ClientTooSlow as error:
            # NOTE: this needs a server whose send waits while the client reads nothing, as
            # zttp's does. A server that buffers whole replies never reaches these limits.
            log.info("download abandoned", extra={"key": self.stored.info.key, "error": str(error)})
        finally:
            self.stored.file.close()
            self.on_close()


async def _file_chunks(stored: StoredObject, start: int, length: int) -> AsyncIterator[bytes]:
    file = stored.file
    await asyncio.to_thread(file.seek, start, os.SEEK_CUR)
    while length > 0:
        chunk = await asyncio.to_thread(file.read, min(COPY_CHUNK_BYTES, length))
        if not chunk:
            # The file is shorter than its header records, so end the reply short rather than pad it.
            log.error("object file is shorter than its header", extra={"key": stored.info.key})
            return
        length -= len(chunk)
        yield chunk


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the inclusive byte range that a single-range header selects.

    Returns None when the header should be ignored and the whole object sent: an unknown unit, a
    malformed value, or several ranges. Raises UnsatisfiableRange when it names no byte.
    """
    unit, _, ranges = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in ranges:
        return None
    first, dash, last = ranges.strip().partition("-")
    # ASCII digits only: str.isdigit also accepts digits such as "²" that int() rejects.
    if not dash or not _RANGE_POSITION.fullmatch(first) or not _RANGE_POSITION.fullmatch(last):
        return None

    if first == "":
        if last == "":
            return None
        suffix = _range_position(last)
        if suffix == 0 or size == 0:
            raise UnsatisfiableRange(header)
        return max(size - suffix, 0), size - 1

    start = _range_position(first)
    if last and _range_position(last) < start:
        return None
    if start >= size:
        raise UnsatisfiableRange(header)
    end = min(_range_position(last), size - 1) if last else size - 1
    return start, end


def _range_position(digits: str) -> int:
    # int() of thousands of digits is slow, and Python 3.11 raises ValueError past 4300 digits.
    # A position of more than MAX_RANGE_DIGITS digits is past the end of any file, so capping it
    # at 10**18 keeps its meaning under RFC 7233 section 2.1 (now RFC 9110 section 14.1.2).
    # A first-pos past the end is unsatisfiable (416), and a last-pos or suffix-length past it
    # means "to the end" (206). Only two capped positions differ from exact values: they compare
    # equal, so "bytes=<huge>-<smaller huge>" gets 416 instead of being ignored as invalid.
    significant = digits.lstrip("0")
    if len(significant) > MAX_RANGE_DIGITS:
        return 10**MAX_RANGE_DIGITS
    return int(significant or "0")


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


async def _upload(storage: LocalStorage, slots: TransferSlots, request: Request) -> Response:
    key = request.path_params["key"]
    params = request.query_params
    try:
        check_key(key)
    except InvalidKey:
        return _error(400, "invalid key")
    if not all(params.get(name) for name in ("expires", "content_type", "max_bytes", "signature")):
        return _error(403, "missing signature")

    expires = _int_or_none(params["expires"])
    max_bytes = _int_or_none(params["max_bytes"])
    content_type = params["content_type"]
    if expires is None or max_bytes is None:
        return _error(403, "invalid signature")
    fields = upload_fields(key, expires, content_type, max_bytes)
    if not is_valid_signature(storage.signing_key, fields, params["signature"]):
        return _error(403, "invalid signature")
    if expires < int(time.time()):
        return _error(403, "expired")

    if not same_content_type(request.headers.get("content-type", ""), content_type):
        return _error(415, f"content type must be {content_type}")
    declared = _int_or_none(request.headers.get("content-length", ""))
    if declared is not None and declared > max_bytes:
        return _error(413, f"body must be at most {max_bytes} bytes")

    owner = key_owner(key)
    if (busy := slots.acquire(owner)) is not None:
        return _unavailable(busy)
    try:
        if not slots.claim_key(key):
            return _error(409, "another upload to this URL is in progress")
        try:
            deadline = _UploadDeadline.start(max_bytes, expires)
            return await _upload_once(storage, request, key, content_type, max_bytes, deadline)
        finally:
            slots.release_key(key)
    finally:
        slots.release(owner)


class _UploadDeadline:
    """The moment an upload must have received its whole body, and the 408 message past it."""

    def __init__(self, at: float, message: str) -> None:
        self.at = at
        self.message = message

    @classmethod
    def start(cls, max_bytes: int, expires: int) -> _UploadDeadline:
        """Return the earlier of the upload's time limit and the expiry of its signed URL, from now."""
        time_limit = transfer_time_limit(max_bytes)
        until_expiry = expires - time.time()
        if until_expiry < time_limit:
            return cls(time.monotonic() + until_expiry, "the upload URL expired before the body was complete")
        return cls(time.monotonic() + time_limit, f"the body did not arrive within {time_limit:g} seconds")

    def wait_seconds(self) -> float:
        """Return how long the next read of the body may wait: the idle timeout, or less near the deadline."""
        return max(0.0, min(BODY_IDLE_TIMEOUT_SECONDS, self.at - time.monotonic()))


async def _upload_once(
    storage: LocalStorage, request: Request, key: str, content_type: str, max_bytes: int, deadline: _UploadDeadline
) -> Response:
    """Store the body under `key`, while this request is the only upload of the key in progress."""
    path = await asyncio.to_thread(storage.object_path, key)
    if await asyncio.to_thread(path.exists):
        return _error(409, "an object was already uploaded with this URL")
    if (refusal := await _check_upload_gate(storage, key)) is not None:
        return refusal

    return await _receive_object(storage, request, key, path, content_type, max_bytes, deadline)


async def _receive_object(
    storage: LocalStorage,
    request: Request,
    key: str,
    path: Path,
    content_type: str,
    max_bytes: int,
    deadline: _UploadDeadline,
) -> Response:
    """Stream the body into a temporary file, stopping as soon as it passes max_bytes or its deadline."""
    temporary: Path | None = None
    file: BinaryIO | None = None
    try:
        digest = hashlib.sha256()
        size = 0
        chunks = aiter(request.stream())
        while True:
            wait_seconds = deadline.wait_seconds()
            try:
                chunk = await asyncio.wait_for(anext(chunks), wait_seconds)
            except StopAsyncIteration:
                break
            except TimeoutError:
                # Decided by the wait rather than the clock, because asyncio can fire a timer early.
                if wait_seconds < BODY_IDLE_TIMEOUT_SECONDS:
                    log.info("upload timed out", extra={"key": key, "received_bytes": size, "error": deadline.message})
                    return _error(408, deadline.message)
                log.info("upload timed out waiting for the body", extra={"key": key, "received_bytes": size})
                return _error(408, f"no body bytes arrived for {BODY_IDLE_TIMEOUT_SECONDS:g} seconds")
            except ClientDisconnect:
                log.info("upload ended by the client before the body was complete", extra={"key": key})
                return _error(400, "incomplete body")
            if not chunk:
                continue

            size += len(chunk)
            if size > max_bytes:
                return _error(413, f"body must be at most {max_bytes} bytes")
            digest.update(chunk)
            if file is None:
                # Opened only once bytes arrive, so a client that sends headers alone costs no file.
                temporary, file = await asyncio.to_thread(storage.create_temporary, path)
                await asyncio.to_thread(file.seek, HEADER_BYTES)
            await asyncio.to_thread(file.write, chunk)

        if file is None:
            temporary, file = await asyncio.to_thread(storage.create_temporary, path)
        await asyncio.to_thread(storage.finish_temporary, file, size, digest.hexdigest(), content_type)
        await asyncio.to_thread(file.close)

        # NOTE: the file can still be deleted between this check and the link below. The object
        # then outlives its file, unless the deletion's own removal of objects runs after the link.
        if (refusal := await _check_upload_gate(storage, key)) is not None:
            return refusal
        try:
            # A link, unlike a rename, fails when another PUT stored an object in the meantime.
            await asyncio.to_thread(os.link, temporary, path)
        except FileExistsError:
            return _error(409, "an object was already uploaded with this URL")
    finally:
        if file is not None:
            await asyncio.to_thread(file.close)
        if temporary is not None:
            await asyncio.to_thread(temporary.unlink, missing_ok=True)

    return JSONResponse({"key": key, "size": size}, headers={"cache-control": "no-store"})


async def _check_upload_gate(storage: LocalStorage, key: str) -> Response | None:
    """Return the reply that refuses the upload when the store's upload gate rejects the key, else None."""
    gate = storage.upload_gate
    if gate is None:
        return None
    try:
        accepted = await gate(key)
    except Exception as error:
        log.error("upload gate failed", extra={"key": key, "error": repr(error)})
        return _unavailable("upload check unavailable")
    if not accepted:
        return _error(410, "this upload is no longer accepted")
    return None


def content_disposition(file_name: str, *, inline: bool) -> str:
    """Return a Content-Disposition value naming the file, safe for any characters in the name.

    It carries an ASCII fallback in `filename` and the exact name in `filename*` (RFC 6266 with
    RFC 5987 encoding), so quotes, backslashes, CR, LF and controls never break the header.
    """
    name = _clean_file_name(file_name)
    encoded = quote(name, safe=_ATTR_CHARS)
    return f"{'inline' if inline else 'attachment'}; filename=\"{_ascii_fallback(name)}\"; filename*=UTF-8''{encoded}"


def _clean_file_name(file_name: str) -> str:
    # A file name is not a path, so separators become "_". Invisible characters are dropped.
    characters = []
    for character in file_name:
        category = unicodedata.category(character)
        if character in "/\\":
            characters.append("_")
        elif category in _DROPPED_CATEGORIES or character in _INVISIBLE_CHARACTERS:
            continue
        elif category == "Zs":
            characters.append(" ")
        else:
            characters.append(character)
    name = "".join(characters).strip()
    if len(name) > MAX_FILE_NAME_CHARACTERS:
        stem, dot, extension = name.rpartition(".")
        if dot and stem and len(extension) <= MAX_EXTENSION_CHARACTERS:
            name = stem[: MAX_FILE_NAME_CHARACTERS - len(extension) - 1] + "." + extension
        else:
            name = name[:MAX_FILE_NAME_CHARACTERS]
    return name or "download"


def _ascii_fallback(name: str) -> str:
    # Accents drop to their base letter. Anything else outside printable ASCII becomes "_", and so
    # do the characters that quoted-string or some browsers treat specially.
    decomposed = unicodedata.normalize("NFKD", name)
    characters = []
    for character in decomposed:
        if unicodedata.combining(character):
            continue
        if " " <= character <= "~" and character not in '"\\%':
            characters.append(character)
        else:
            characters.append("_")
    return "".join(characters) or "download"


def _int_or_none(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _error(status: int, message: str, *, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"cache-control": "no-store", **(headers or {})})


def _unavailable(message: str) -> JSONResponse:
    return _error(503, message, headers={"retry-after": str(RETRY_AFTER_SECONDS)})
