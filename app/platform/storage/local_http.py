"""The HTTP endpoints behind the local adapter's signed URLs.

    GET|HEAD /storage/v1/local/<key>?expires=&name=&disposition=&signature=
    PUT      /storage/v1/local/<key>?expires=&content_type=&max_bytes=&signature=

The signature is the credential, so these routes need no Authorization header. A failure gets a
small JSON body such as {"error": "expired"} and never a stack trace. The statuses are
400 invalid key, 403 missing, invalid or expired signature, 404 no object, 413 body over
max_bytes, 415 Content-Type other than the signed one, 416 unsatisfiable Range, and 500
(logged) for anything unexpected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import unicodedata
from collections.abc import AsyncIterator
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
from app.platform.storage.port import ObjectNotFound
from app.platform.storage.signing import is_valid_signature

log = logging.getLogger(__name__)

# File names longer than this are shortened, keeping the extension, so the header stays small.
MAX_FILE_NAME_CHARACTERS = 200
MAX_EXTENSION_CHARACTERS = 16
# Characters that RFC 5987 allows unencoded in an ext-value (attr-char), beside letters and digits.
_ATTR_CHARS = "!#$&+-.^_`|~"
# Bidirectional controls can disguise an extension ("evil\u202egnp.exe" displays as "evilexe.png").
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class UnsatisfiableRange(Exception):
    """The Range header names no byte of the object."""


def signed_url_routes(storage: LocalStorage) -> list[Route]:
    """Return the route that serves downloads (GET, HEAD) and uploads (PUT) of signed URLs."""

    async def endpoint(request: Request) -> Response:
        try:
            if request.method == "PUT":
                return await _upload(storage, request)
            return await _download(storage, request)
        except Exception:
            log.exception("signed URL request failed", extra={"method": request.method})
            return _error(500, "internal error")

    return [Route(URL_PATH_PREFIX + "{key:path}", endpoint, methods=["GET", "HEAD", "PUT"])]


async def _download(storage: LocalStorage, request: Request) -> Response:
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

    try:
        stored = await asyncio.to_thread(storage.open_object, key)
    except ObjectNotFound:
        return _error(404, "not found")
    try:
        return _object_response(request, stored, params["name"], disposition == "inline", remaining)
    except BaseException:
        stored.file.close()
        raise


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
    and it is closed even when the client leaves before the first chunk.
    """

    def __init__(self, stored: StoredObject, start: int, length: int, **options) -> None:
        super().__init__(_file_chunks(stored, start, length), **options)
        self.stored = stored

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stored.file.close()


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
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None

    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise UnsatisfiableRange(header)
        return max(size - suffix, 0), size - 1

    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise UnsatisfiableRange(header)
    end = min(int(last), size - 1) if last else size - 1
    return start, end


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


async def _upload(storage: LocalStorage, request: Request) -> Response:
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
    if await asyncio.to_thread(storage.object_path(key).exists):
        return _error(409, "an object was already uploaded with this URL")

    return await _receive_object(storage, request, key, content_type, max_bytes)


async def _receive_object(storage: LocalStorage, request: Request, key: str, content_type: str, max_bytes: int) -> Response:
    """Stream the body into a temporary file, stopping as soon as it passes max_bytes."""
    path = await asyncio.to_thread(storage.object_path, key)
    temporary, file = await asyncio.to_thread(storage.create_temporary, path)
    try:
        with file:
            await asyncio.to_thread(file.seek, HEADER_BYTES)
            digest = hashlib.sha256()
            size = 0
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_bytes:
                        return _error(413, f"body must be at most {max_bytes} bytes")
                    digest.update(chunk)
                    await asyncio.to_thread(file.write, chunk)
            except ClientDisconnect:
                log.info("upload ended by the client before the body was complete", extra={"key": key})
                return _error(400, "incomplete body")
            await asyncio.to_thread(storage.finish_temporary, file, size, digest.hexdigest(), content_type)
        try:
            # A link, unlike a rename, fails when another PUT stored an object in the meantime.
            await asyncio.to_thread(os.link, temporary, path)
        except FileExistsError:
            return _error(409, "an object was already uploaded with this URL")
    finally:
        await asyncio.to_thread(temporary.unlink, missing_ok=True)

    return JSONResponse({"key": key, "size": size}, headers={"cache-control": "no-store"})


def content_disposition(file_name: str, *, inline: bool) -> str:
    """Return a Content-Disposition value naming the file, safe for any characters in the name.

    It carries an ASCII fallback in `filename` and the exact name in `filename*` (RFC 6266 with
    RFC 5987 encoding), so quotes, backslashes, CR, LF and controls never break the header.
    """
    name = _clean_file_name(file_name)
    encoded = quote(name, safe=_ATTR_CHARS)
    return f"{'inline' if inline else 'attachment'}; filename=\"{_ascii_fallback(name)}\"; filename*=UTF-8''{encoded}"


def _clean_file_name(file_name: str) -> str:
    # A file name is not a path, so separators become "_". Controls and bidi marks are dropped.
    characters = []
    for character in file_name:
        if character in "/\\":
            characters.append("_")
        elif unicodedata.category(character) in ("Cc", "Cs") or character in _BIDI_CONTROLS:
            continue
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
