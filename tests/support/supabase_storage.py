"""A stand-in for the Supabase Storage API, for tests: the real Storage server cannot run here.

It is not Supabase. It serves, under /storage/v1 on a real 127.0.0.1 socket, the subset of the
Storage API that storage3 2.34 calls, with these behaviours as observed against Storage v1.11:

    POST|PUT /object/{bucket}/{path}             upload (multipart, or a raw body); POST replaces
                                                 only with the header x-upsert: "true" (a string)
    GET      /object/{bucket}/{path}             download with the service key
    GET      /object/info/{bucket}/{path}        size, content type, etag
    POST     /object/sign/{bucket}/{path}        {"expiresIn": N} (+ "download") -> {"signedURL"}
    GET      /object/sign/{bucket}/{path}?token= signed download, with Range
    POST     /object/upload/sign/{bucket}/{path} -> {"url": "/object/upload/sign/...?token=..."}
    PUT      /object/upload/sign/{bucket}/{path}?token=   signed upload
    POST     /object/list/{bucket}               one level below "prefix", folders with id null
    POST     /object/move, /object/copy          {"bucketId", "sourceKey", "destinationKey"}
    DELETE   /object/{bucket}                    {"prefixes": [names]}; missing names are ignored

Errors come back as HTTP 400 with a string statusCode in the JSON body ("404" NoSuchKey,
"409" KeyAlreadyExists, "415" InvalidMimeType, "413" EntityTooLarge). A multipart upload takes
the file part's content type, which storage3 sets to text/plain;charset=UTF-8 unless the caller
passes one. An expired or forged token on a signed GET reads as "Bucket not found". Every other
route needs the service key as `Authorization: Bearer` and as `apikey`.

Tests steer it with `fail_next` (503, a hang past the client's timeout, or a connection closed
mid-reply), `restrict_bucket` (allowed MIME types, size limit) and read `requests`.

    with run_supabase_storage() as storage:
        env = storage.env()   # STORAGE_BACKEND, SUPABASE_URL, SUPABASE_SERVICE_KEY, SUPABASE_STORAGE_BUCKET

or, in a conftest.py, `from tests.support.supabase_storage import supabase_storage_standin` for a
session fixture (call `reset()` between tests that must not see each other's objects).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote

import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.servers import STARTUP_TIMEOUT_SECONDS, free_port

FailureMode = Literal["503", "hang", "close"]
# A hung request is released after this long, or when the stand-in stops.
HANG_SECONDS = 30.0
SIGNED_UPLOAD_SECONDS = 2 * 3600


@dataclass
class StoredObject:
    """One object in a bucket."""

    data: bytes
    content_type: str
    cache_control: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.data, usedforsecurity=False).hexdigest()}"'

    def metadata(self) -> dict:
        return {
            "eTag": self.etag,
            "size": len(self.data),
            "mimetype": self.content_type,
            "cacheControl": f"max-age={self.cache_control}",
            "lastModified": self.created_at,
            "contentLength": len(self.data),
            "httpStatusCode": 200,
        }


@dataclass
class BucketRules:
    """Limits of one bucket, like the bucket settings of a Supabase project."""

    allowed_mime_types: list[str] | None = None
    file_size_limit: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """A request the stand-in received, for tests to inspect."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    # Content type the upload was stored with (the file part's, for multipart), else None.
    upload_content_type: str | None = None


class SupabaseStorageStandIn:
    """The state and the ASGI app of the stand-in; `run_supabase_storage` serves it."""

    def __init__(self, *, service_key: str, bucket: str) -> None:
        self.service_key = service_key
        self.bucket = bucket
        self.url = ""
        self.buckets: dict[str, dict[str, StoredObject]] = {bucket: {}}
        self.rules: dict[str, BucketRules] = {bucket: BucketRules()}
        self.requests: list[RecordedRequest] = []
        self._jwt_secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._failures: list[FailureMode] = []
        self._release_hangs = threading.Event()
        self.app = Starlette(routes=self._routes())

    # Test controls.

    def env(self) -> dict[str, str]:
        """Return the settings that point the service at this stand-in."""
        return {
            "STORAGE_BACKEND": "supabase",
            "SUPABASE_URL": self.url,
            "SUPABASE_SERVICE_KEY": self.service_key,
            "SUPABASE_STORAGE_BUCKET": self.bucket,
        }

    def fail_next(self, count: int, mode: FailureMode) -> None:
        """Make the next `count` requests fail: "503", "hang" (no reply until released), or "close"."""
        with self._lock:
            self._failures.extend([mode] * count)

    def restrict_bucket(
        self, *, allowed_mime_types: list[str] | None = None, file_size_limit: int | None = None, bucket: str | None = None
    ) -> None:
        """Limit a bucket's uploads to MIME types (wildcards such as image/* allowed) and a size."""
        self.rules[bucket or self.bucket] = BucketRules(allowed_mime_types, file_size_limit)

    def reset(self) -> None:
        """Forget objects, rules, pending failures and recorded requests."""
        with self._lock:
            self._failures.clear()
        self.buckets = {self.bucket: {}}
        self.rules = {self.bucket: BucketRules()}
        self.requests.clear()

    def release_hangs(self) -> None:
        self._release_hangs.set()

    # ASGI entry: failure injection in front of the routes.

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None

        if failure == "503":
            await _send_raw(send, 503, b"upstream connect error or disconnect/reset before headers", b"text/plain")
        elif failure == "hang":
            await asyncio.to_thread(self._release_hangs.wait, HANG_SECONDS)
            await _send_raw(send, 504, b"gateway timeout", b"text/plain")
        elif failure == "close":
            # Headers that promise a body, a fragment of it, then the connection closes.
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b'{"Key":', "more_body": True})
        else:
            await self.app(scope, receive, send)

    def _routes(self) -> list[Route]:
        prefix = "/storage/v1/object"
        return [
            Route(prefix + "/sign/{bucket}/{path:path}", self._create_signed_url, methods=["POST"]),
            Route(prefix + "/sign/{bucket}/{path:path}", self._signed_download, methods=["GET", "HEAD"]),
            Route(prefix + "/upload/sign/{bucket}/{path:path}", self._create_signed_upload_url, methods=["POST"]),
            Route(prefix + "/upload/sign/{bucket}/{path:path}", self._signed_upload, methods=["PUT"]),
            Route(prefix + "/info/{bucket}/{path:path}", self._info, methods=["GET"]),
            Route(prefix + "/list/{bucket}", self._list, methods=["POST"]),
            Route(prefix + "/move", self._move, methods=["POST"]),
            Route(prefix + "/copy", self._copy, methods=["POST"]),
            Route(prefix + "/{bucket}", self._remove, methods=["DELETE"]),
            Route(prefix + "/{bucket}/{path:path}", self._upload, methods=["POST", "PUT"]),
            Route(prefix + "/{bucket}/{path:path}", self._download, methods=["GET", "HEAD"]),
        ]

    # Routes with the service key.

    async def _upload(self, request: Request) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        bucket, name = request.path_params["bucket"], request.path_params["path"]
        # PUT updates; POST replaces only when x-upsert is exactly the string "true".
        upsert = request.method == "PUT" or request.headers.get("x-upsert") == "true"
        return await self._store(request, bucket, name, upsert=upsert)

    async def _download(self, request: Request) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        found = self._find(request.path_params["bucket"], request.path_params["path"])
        if isinstance(found, Response):
            return found
        return _object_reply(request, found, download=None)

    async def _info(self, request: Request) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        bucket, name = request.path_params["bucket"], request.path_params["path"]
        found = self._find(bucket, name)
        if isinstance(found, Response):
            return found
        return JSONResponse({
            "id": found.id,
            "name": name,
            "version": found.id,
            "bucket_id": bucket,
            "size": len(found.data),
            "content_type": found.content_type,
            "cache_control": f"max-age={found.cache_control}",
            "etag": found.etag,
            "metadata": {},
            "last_modified": found.created_at,
            "created_at": found.created_at,
        })

    async def _create_signed_url(self, request: Request) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        bucket, name = request.path_params["bucket"], request.path_params["path"]
        body = await _json_body(request)
        expires_in = body.get("expiresIn") if isinstance(body, dict) else None
        # storage3 sends expiresIn as a string of digits; the server coerces it to an integer.
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in < 1:
            return storage_error("400", "InvalidRequest", "body/expiresIn must be >= 1")
        found = self._find(bucket, name)
        if isinstance(found, Response):
            return found

        token = jwt.encode({"url": f"{bucket}/{name}", "iat": int(time.time()), "exp": int(time.time()) + expires_in}, self._jwt_secret, algorithm="HS256")
        return JSONResponse({"signedURL": f"/object/sign/{bucket}/{quote(name)}?token={token}"})

    async def _create_signed_upload_url(self, request: Request) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        bucket, name = request.path_params["bucket"], request.path_params["path"]
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found")
        upsert = request.headers.get("x-upsert") == "true"
        if not upsert and name in self.buckets[bucket]:
            return storage_error("409", "Duplicate", "The resource already exists", code="KeyAlreadyExists")

        now = int(time.time())
        token = jwt.encode({"url": f"{bucket}/{name}", "upsert": upsert, "iat": now, "exp": now + SIGNED_UPLOAD_SECONDS}, self._jwt_secret, algorithm="HS256")
        return JSONResponse({"url": f"/object/upload/sign/{bucket}/{quote(name)}?token={token}", "token": token})

    async def _list(self, request: Request) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        bucket = request.path_params["bucket"]
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found")
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("prefix", ""), str):
            return storage_error("400", "InvalidRequest", "body/prefix must be string")
        prefix = body.get("prefix", "")
        folder = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        limit, offset = int(body.get("limit", 100)), int(body.get("offset", 0))

        # One row per name on this level, like the storage.search SQL function: a name that is
        # both an object and a folder is a single row carrying the object's id.
        objects = self.buckets[bucket]
        names = sorted({name[len(folder):].split("/")[0] for name in objects if name.startswith(folder)})
        rows = []
        for entry in names[offset : offset + limit]:
            stored = objects.get(folder + entry)
            if stored is None:
                rows.append({"name": entry, "id": None, "updated_at": None, "created_at": None, "last_accessed_at": None, "metadata": None})
            else:
                rows.append({
                    "name": entry, "id": stored.id, "updated_at": stored.created_at, "created_at": stored.created_at,
                    "last_accessed_at": stored.created_at, "metadata": stored.metadata(),
                })
        return JSONResponse(rows)

    async def _move(self, request: Request) -> Response:
        return await self._move_or_copy(request, keep_source=False)

    async def _copy(self, request: Request) -> Response:
        return await self._move_or_copy(request, keep_source=True)

    async def _move_or_copy(self, request: Request, *, keep_source: bool) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        body = await _json_body(request)
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in ("bucketId", "sourceKey", "destinationKey")):
            return storage_error("400", "InvalidRequest", "body must have bucketId, sourceKey and destinationKey")
        bucket = body["bucketId"]
        found = self._find(bucket, body["sourceKey"])
        if isinstance(found, Response):
            return found
        if body["destinationKey"] in self.buckets[bucket]:
            return storage_error("409", "Duplicate", "The resource already exists", code="KeyAlreadyExists")

        self.buckets[bucket][body["destinationKey"]] = StoredObject(found.data, found.content_type, found.cache_control)
        if keep_source:
            return JSONResponse({"Key": f"{bucket}/{body['destinationKey']}"})
        del self.buckets[bucket][body["sourceKey"]]
        return JSONResponse({"message": "Successfully moved"})

    async def _remove(self, request: Request) -> Response:
        denied = self._check_service_key(request)
        if denied is not None:
            return denied
        bucket = request.path_params["bucket"]
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found")
        body = await _json_body(request)
        prefixes = body.get("prefixes") if isinstance(body, dict) else None
        if not isinstance(prefixes, list) or not prefixes or not all(isinstance(p, str) for p in prefixes):
            return storage_error("400", "InvalidRequest", "body/prefixes must NOT have fewer than 1 items")

        removed = []
        for name in prefixes:
            stored = self.buckets[bucket].pop(name, None)
            if stored is not None:
                removed.append({"name": name, "bucket_id": bucket, "id": stored.id, "metadata": stored.metadata()})
        return JSONResponse(removed)

    # Routes with a token instead of the service key.

    async def _signed_download(self, request: Request) -> Response:
        self._record(request)
        bucket, name = request.path_params["bucket"], request.path_params["path"]
        if not self._is_valid_token(request.query_params.get("token", ""), f"{bucket}/{name}"):
            return storage_error("404", "Bucket not found", "Bucket not found")
        stored = self.buckets.get(bucket, {}).get(name)
        if stored is None:
            return storage_error("404", "not_found", "Object not found", code="NoSuchKey")
        return _object_reply(request, stored, download=request.query_params.get("download"))

    async def _signed_upload(self, request: Request) -> Response:
        bucket, name = request.path_params["bucket"], request.path_params["path"]
        try:
            claims = jwt.decode(request.query_params.get("token", ""), self._jwt_secret, algorithms=["HS256"])
        except jwt.ExpiredSignatureError:
            self._record(request)
            return storage_error("400", "InvalidJWT", "jwt expired")
        except jwt.InvalidTokenError:
            self._record(request)
            return storage_error("400", "InvalidJWT", "invalid signature")
        if claims.get("url") != f"{bucket}/{name}":
            self._record(request)
            return storage_error("400", "InvalidSignature", "The url do not match the signature")
        return await self._store(request, bucket, name, upsert=bool(claims.get("upsert")))

    # Shared steps.

    async def _store(self, request: Request, bucket: str, name: str, *, upsert: bool) -> Response:
        body = await request.body()
        content_type, data, cache_control = _upload_parts(request.headers.get("content-type", ""), body)
        self._record(request, upload_content_type=content_type)
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found")
        if data is None:
            return storage_error("400", "InvalidRequest", "the multipart body has no file part")

        rules = self.rules.get(bucket, BucketRules())
        if rules.allowed_mime_types is not None and not _is_allowed(content_type, rules.allowed_mime_types):
            return storage_error("415", "invalid_mime_type", f"mime type {content_type} is not supported", code="InvalidMimeType")
        if rules.file_size_limit is not None and len(data) > rules.file_size_limit:
            return storage_error("413", "Payload too large", "The object exceeded the maximum allowed size", code="EntityTooLarge")
        if not upsert and name in self.buckets[bucket]:
            return storage_error("409", "Duplicate", "The resource already exists", code="KeyAlreadyExists")

        stored = StoredObject(data, content_type, cache_control)
        self.buckets[bucket][name] = stored
        return JSONResponse({"Key": f"{bucket}/{name}", "Id": stored.id})

    def _find(self, bucket: str, name: str) -> StoredObject | Response:
        if bucket not in self.buckets:
            return storage_error("404", "Bucket not found", "Bucket not found")
        stored = self.buckets[bucket].get(name)
        if stored is None:
            return storage_error("404", "not_found", "Object not found", code="NoSuchKey")
        return stored

    def _check_service_key(self, request: Request) -> Response | None:
        self._record(request)
        if request.headers.get("apikey") is None:
            # The API gateway rejects a request without an API key before it reaches Storage.
            return JSONResponse({"message": "No API key found in request"}, status_code=401)
        if request.headers.get("apikey") != self.service_key:
            return JSONResponse({"message": "Invalid API key"}, status_code=401)
        if request.headers.get("authorization") != f"Bearer {self.service_key}":
            return storage_error("403", "Unauthorized", "invalid signature")
        return None

    def _is_valid_token(self, token: str, url: str) -> bool:
        try:
            claims = jwt.decode(token, self._jwt_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return False
        return claims.get("url") == url

    def _record(self, request: Request, *, upload_content_type: str | None = None) -> None:
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.url.path,
                query=request.url.query,
                headers={key.decode("latin-1"): value.decode("latin-1") for key, value in request.scope["headers"]},
                upload_content_type=upload_content_type,
            )
        )


def storage_error(status_code: str, error: str, message: str, *, code: str | None = None) -> JSONResponse:
    """Return an error the way Storage does: HTTP 400 with the real status as a string in the body."""
    return JSONResponse({"statusCode": status_code, "code": code or error, "error": error, "message": message}, status_code=400)


def _object_reply(request: Request, stored: StoredObject, *, download: str | None) -> Response:
    size = len(stored.data)
    headers = {
        "content-type": stored.content_type,
        "cache-control": f"max-age={stored.cache_control}",
        "etag": stored.etag,
        "accept-ranges": "bytes",
    }
    if download is not None:
        encoded = quote(download, safe="")
        headers["content-disposition"] = f"attachment; filename={encoded}; filename*=UTF-8''{encoded};" if download else "attachment;"

    start, end, status = 0, size - 1, 200
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("range", ""))
    if match and (match[1] or match[2]):
        if match[1]:
            start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
        else:
            start, end = max(size - int(match[2]), 0), size - 1
        if start >= size or start > end:
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        status = 206
        headers["content-range"] = f"bytes {start}-{end}/{size}"

    body = stored.data[start : end + 1]
    if request.method == "HEAD":
        return Response(status_code=status, headers={**headers, "content-length": str(len(body))})
    return Response(body, status_code=status, headers=headers)


def _upload_parts(content_type: str, body: bytes) -> tuple[str, bytes | None, str]:
    """Return the stored content type, the bytes and the cache control of an upload body."""
    if not content_type.lower().startswith("multipart/form-data"):
        return content_type or "application/octet-stream", body, "no-cache"

    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if boundary is None:
        return content_type, None, "no-cache"
    fields: dict[str, tuple[dict[str, str], bytes]] = {}
    for part in body.split(b"--" + boundary[1].encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        name = re.search(r'\bname="([^"]*)"', headers.get("content-disposition", ""))
        if name:
            fields[name[1]] = (headers, data.removesuffix(b"\r\n"))

    cache_control = fields["cacheControl"][1].decode() if "cacheControl" in fields else "no-cache"
    if "file" not in fields:
        return "", None, cache_control
    file_headers, data = fields["file"]
    return file_headers.get("content-type", "application/octet-stream"), data, cache_control


def _is_allowed(content_type: str, allowed: list[str]) -> bool:
    media_type = content_type.split(";")[0].strip().lower()
    return any(fnmatch.fnmatchcase(media_type, pattern.lower()) for pattern in allowed)


async def _json_body(request: Request) -> object:
    try:
        return json.loads(await request.body() or b"{}")
    except ValueError:
        return None


async def _send_raw(send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def run_supabase_storage(*, service_key: str | None = None, bucket: str = "files") -> Iterator[SupabaseStorageStandIn]:
    """Serve a fresh stand-in on 127.0.0.1 with uvicorn in a thread for the duration of the block."""
    standin = SupabaseStorageStandIn(service_key=service_key or "service-" + secrets.token_hex(16), bucket=bucket)
    port = free_port()
    config = uvicorn.Config(
        standin, host="127.0.0.1", port=port, http="h11", lifespan="off", log_config=None, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"supabase-storage-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("Supabase Storage stand-in did not start")
        time.sleep(0.02)

    standin.url = f"http://127.0.0.1:{port}"
    try:
        yield standin
    finally:
        standin.release_hangs()
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def supabase_storage_standin() -> Iterator[SupabaseStorageStandIn]:
    """The stand-in, served for the whole test session."""
    with run_supabase_storage() as standin:
        yield standin
