"""The local disk adapter: the embedded default, which serves its own signed URLs.

Layout under the root directory (STORAGE_LOCAL_DIR):

    .signing-key                 32 random bytes, mode 0600, when STORAGE_SIGNING_KEY is empty
    objects/<uid>/<id>~object    the object with key <uid>/<id>
    objects/<uid>/<id>/thumbnail~object    a derived key below it

"~" never occurs in a key, so an object file never collides with the directory of the keys
below it. Temporary files (`<id>~tmp.<random>`) sit next to the object they will become, and
remove_stale_temporaries deletes those that a crash left behind. Each object file starts with a fixed HEADER_BYTES-long JSON header (content type,
size, SHA-256), space-padded and ended by a newline, followed by the bytes. One os.replace
therefore swaps the bytes and their content type together, and a reader that opened the old
file keeps reading the old object.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlencode

from app.platform.storage.keys import check_content_type, check_key
from app.platform.storage.port import (
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)
from app.platform.storage.signing import sign, signing_key_from

log = logging.getLogger(__name__)

OBJECTS_DIR = "objects"
OBJECT_SUFFIX = "~object"
TEMPORARY_MARK = "~tmp."
HEADER_BYTES = 1024
# Path prefix of the routes that serve signed URLs. The object key follows it.
URL_PATH_PREFIX = "/storage/v1/local/"
COPY_CHUNK_BYTES = 64 * 1024

# Called with an object key before and after a signed-URL PUT stores bytes under it.
UploadGate = Callable[[str], Awaitable[bool]]
_Result = TypeVar("_Result")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object's header, and the open file positioned at its first byte."""

    info: ObjectInfo
    sha256: str
    file: BinaryIO


class LocalStorage:
    """Objects in files under one directory, with HMAC-signed URLs that this app serves.

    Attributes:
        upload_gate: None, or an async function that the PUT route of a signed upload URL calls
            with the object key, before it reads the body and again before it links the
            finished object into place. It returns whether the key still expects an upload
            (False once its file was deleted, for example). On False the PUT gets 410 and
            nothing is kept; when the gate raises, the PUT gets 503. The files domain sets it.

    Every OSError other than a missing object, including a missing or replaced objects
    directory, becomes StorageUnavailable. The signing key is read once, at construction, so
    deleting its file later changes nothing until the next start.
    """

    def __init__(
        self, root: Path, *, public_base_url: str, signing_key: str = "", upload_gate: UploadGate | None = None
    ) -> None:
        """Open (creating it when missing) the store at `root`.

        Args:
            public_base_url: scheme, host and port that clients reach this app at.
            signing_key: the URL signing key. Empty means a random key kept under `root`.
            upload_gate: see the class docstring.
        """
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root.resolve()
        self.objects_root = self.root / OBJECTS_DIR
        self.objects_root.mkdir(mode=0o700, exist_ok=True)
        self.public_base_url = public_base_url.rstrip("/")
        self.signing_key = signing_key_from(signing_key, self.root)
        self.upload_gate = upload_gate

    @classmethod
    def from_settings(cls, settings) -> LocalStorage:
        """Open the store named by STORAGE_LOCAL_DIR, STORAGE_SIGNING_KEY and the public base URL."""
        return cls(
            settings.storage_local_dir,
            public_base_url=settings.effective_public_base_url,
            signing_key=settings.storage_signing_key,
        )

    async def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        """Store `data` under `key`, replacing any object there."""
        check_key(key)
        check_content_type(content_type)
        return await self._in_thread(self._put, key, bytes(data), content_type)

    async def get(self, key: str) -> bytes:
        """Return the bytes of the object, or raise ObjectNotFound."""
        check_key(key)
        return await self._in_thread(self._read_all, key)

    async def info(self, key: str) -> ObjectInfo:
        """Return the size and content type of the object, or raise ObjectNotFound."""
        check_key(key)
        return await self._in_thread(self._read_info, key)

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove the objects, ignoring keys with no object."""
        for key in keys:
            check_key(key)
        await self._in_thread(self._remove, list(keys))

    async def list_keys(self, prefix: str) -> list[str]:
        """Return every key that starts with `prefix` followed by "/", sorted."""
        check_key(prefix)
        return await self._in_thread(self._walk, prefix)

    async def remove_stale_temporaries(self, older_than_seconds: float) -> int:
        """Delete temporary files last modified more than `older_than_seconds` ago; return how many.

        A crash between creating a temporary file and linking or deleting it leaves the file
        behind. An upload in progress writes to its file at least every BODY_IDLE_TIMEOUT_SECONDS
        of local_http, so a cutoff well above that spares it.
        """
        if older_than_seconds < 0:
            raise ValueError(f"older_than_seconds must be zero or more: got {older_than_seconds}")
        return await self._in_thread(self._remove_temporaries, time.time() - older_than_seconds)

    async def signed_download_url(
        self, key: str, *, expires_in_seconds: int, file_name: str, inline: bool
    ) -> str:
        """Return a URL that serves the object with GET or HEAD until it expires, or raise ObjectNotFound."""
        await self.info(key)
        expires = int(time.time()) + expires_in_seconds
        name = to_valid_unicode(file_name)
        disposition = "inline" if inline else "attachment"
        signature = sign(self.signing_key, download_fields(key, expires, name, disposition))
        query = urlencode({"expires": expires, "name": name, "disposition": disposition, "signature": signature})
        return f"{self.public_base_url}{URL_PATH_PREFIX}{key}?{query}"

    async def signed_upload_url(
        self, key: str, *, expires_in_seconds: int, content_type: str, max_bytes: int
    ) -> str:
        """Return a URL that takes one PUT of at most `max_bytes` of `content_type` until it expires.

        The PUT must send the same Content-Type. It fails with 409 while an object exists under
        the key, so the URL cannot replace bytes that were already accepted.
        """
        check_key(key)
        check_content_type(content_type)
        if max_bytes < 0:
            raise StorageError(f"max_bytes must be zero or more: got {max_bytes}")
        expires = int(time.time()) + expires_in_seconds
        signature = sign(self.signing_key, upload_fields(key, expires, content_type, max_bytes))
        query = urlencode({"expires": expires, "content_type": content_type, "max_bytes": max_bytes, "signature": signature})
        return f"{self.public_base_url}{URL_PATH_PREFIX}{key}?{query}"

    async def aclose(self) -> None:
        """Release nothing, because every call opens and closes its own files."""

    def routes(self) -> list:
        """Return the Starlette routes that serve this store's signed URLs, under URL_PATH_PREFIX."""
        from app.platform.storage.local_http import signed_url_routes

        return signed_url_routes(self)

    async def _in_thread(self, function: Callable[..., _Result], *arguments) -> _Result:
        """Run blocking file I/O in a thread, reporting a disk failure as StorageUnavailable."""
        try:
            return await asyncio.to_thread(function, *arguments)
        except OSError as error:
            raise StorageUnavailable(f"local storage under {self.root} failed: {error!r}") from error

    # Paths and file I/O. The methods below block, so async callers run them in a thread.
    # They raise OSError for disk failures; _in_thread and the HTTP routes translate it.

    def check_objects_root(self) -> None:
        """Raise StorageUnavailable unless the objects directory is still a directory.

        A missing or replaced directory means the disk or a volume mount changed under the
        app, which is an outage: reporting every object as not found would mislead callers.
        """
        try:
            mode = os.lstat(self.objects_root).st_mode
        except OSError as error:
            raise StorageUnavailable(f"objects directory {self.objects_root} is not readable: {error!r}") from error
        if not stat.S_ISDIR(mode):
            raise StorageUnavailable(f"objects directory {self.objects_root} is no longer a directory")

    def object_path(self, key: str) -> Path:
        """Return the file of the object with this key, after checking the key and the path."""
        check_key(key)
        return self._resolve_inside(self.objects_root / (key + OBJECT_SUFFIX), key)

    def _resolve_inside(self, path: Path, key: str) -> Path:
        # Checked keys cannot climb out, but a symbolic link inside the root still could.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.objects_root):
            # A replaced objects directory is an outage, not a bad key.
            self.check_objects_root()
            raise StorageError(f"object key {key!r} resolves outside the storage root")
        return resolved

    def open_object(self, key: str) -> StoredObject:
        """Open the object file and read its header. The caller closes the file."""
        path = self.object_path(key)
        try:
            file = path.open("rb")
        except (FileNotFoundError, NotADirectoryError) as error:
            self.check_objects_root()
            raise ObjectNotFound(f"no object has key {key!r}") from error
        try:
            header = json.loads(file.read(HEADER_BYTES))
            info = ObjectInfo(key=key, size=int(header["size"]), content_type=str(header["content_type"]))
            return StoredObject(info=info, sha256=str(header["sha256"]), file=file)
        except (ValueError, KeyError, TypeError) as error:
            file.close()
            raise StorageError(f"object file of key {key!r} has an unreadable header") from error
        except BaseException:
            file.close()
            raise

    def _read_all(self, key: str) -> bytes:
        stored = self.open_object(key)
        with stored.file:
            return stored.file.read()

    def _read_info(self, key: str) -> ObjectInfo:
        stored = self.open_object(key)
        stored.file.close()
        return stored.info

    def _put(self, key: str, data: bytes, content_type: str) -> ObjectInfo:
        path = self.object_path(key)
        temporary, file = self.create_temporary(path)
        try:
            with file:
                file.seek(HEADER_BYTES)
                file.write(data)
                self.finish_temporary(file, len(data), hashlib.sha256(data).hexdigest(), content_type)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return ObjectInfo(key=key, size=len(data), content_type=content_type)

    def create_temporary(self, path: Path) -> tuple[Path, BinaryIO]:
        """Create a private temporary file next to the object file, creating directories as needed.

        Its name contains "~", so listing never mistakes it for an object.
        """
        temporary = path.with_name(f"{path.name.removesuffix(OBJECT_SUFFIX)}{TEMPORARY_MARK}{secrets.token_hex(8)}")
        # A concurrent delete may remove an empty directory between mkdir and open, so retry.
        for _ in range(3):
            self._make_parents(path)
            try:
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                continue
            return temporary, os.fdopen(descriptor, "wb")
        self.check_objects_root()
        raise StorageUnavailable(f"could not create a file in {path.parent}")

    def _make_parents(self, path: Path) -> None:
        # Only directories below the objects directory are created, never the objects directory
        # itself: when it is gone, the first mkdir fails and the store reports an outage.
        self.check_objects_root()
        directory = self.objects_root
        for part in path.parent.relative_to(self.objects_root).parts:
            directory = directory / part
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                continue

    @staticmethod
    def finish_temporary(file: BinaryIO, size: int, sha256: str, content_type: str) -> None:
        """Write the header at the start of the file and flush it to disk."""
        header = json.dumps({"format": 1, "content_type": content_type, "size": size, "sha256": sha256}).encode()
        file.seek(0)
        file.write(header.ljust(HEADER_BYTES - 1) + b"\n")
        file.flush()
        os.fsync(file.fileno())

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            path = self.object_path(key)
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                self.check_objects_root()
                continue
            self._remove_empty_parents(path.parent)

    def _remove_empty_parents(self, directory: Path) -> None:
        while directory != self.objects_root and directory.is_relative_to(self.objects_root):
            try:
                directory.rmdir()
            except OSError:
                # Not empty (other keys live below it) or already gone.
                return
            directory = directory.parent

    def _walk(self, prefix: str) -> list[str]:
        self.check_objects_root()
        directory = self._resolve_inside(self.objects_root / prefix, prefix)
        if not directory.is_dir():
            return []

        def fail(error: OSError) -> None:
            # Without onerror, os.walk skips unreadable directories silently, which would hide keys.
            raise error

        keys = []
        for parent, _, files in os.walk(directory, onerror=fail):
            for name in files:
                if name.endswith(OBJECT_SUFFIX):
                    relative = (Path(parent) / name).relative_to(self.objects_root).as_posix()
                    keys.append(relative.removesuffix(OBJECT_SUFFIX))
        return sorted(keys)

    def _remove_temporaries(self, cutoff: float) -> int:
        self.check_objects_root()
        removed = 0
        for parent, _, files in os.walk(self.objects_root):
            for name in files:
                if TEMPORARY_MARK not in name:
                    continue
                path = Path(parent) / name
                try:
                    if path.lstat().st_mtime >= cutoff:
                        continue
                    path.unlink()
                except FileNotFoundError:
                    # Linked into place or removed by its upload in the meantime.
                    continue
                removed += 1
                self._remove_empty_parents(path.parent)
        if removed:
            log.info("removed stale temporary files", extra={"count": removed})
        return removed


def download_fields(key: str, expires: int, file_name: str, disposition: str) -> list[str | int]:
    """Return the signed fields of a download URL."""
    return ["GET", key, expires, file_name, disposition]


def upload_fields(key: str, expires: int, content_type: str, max_bytes: int) -> list[str | int]:
    """Return the signed fields of an upload URL."""
    return ["PUT", key, expires, content_type, max_bytes]


def to_valid_unicode(text: str) -> str:
    """Replace lone surrogates, which UTF-8 cannot encode, with U+FFFD."""
    return "".join("\ufffd" if 0xD800 <= ord(character) <= 0xDFFF else character for character in text)
