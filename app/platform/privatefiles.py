"""Files that only this service's user may read, such as generated keys, created without races."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


def create_private_file(path: Path, content: bytes) -> bool:
    """Create `path` with mode 0600 holding `content`; return False when it already exists.

    The content goes to a private temporary file first, which is then linked into place. So
    the file is never readable by others or half-written, and when processes race to create
    it, one wins and the others read the winner's file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    return True


def read_private_file(path: Path) -> bytes:
    """Return the content of `path`, first restricting it to mode 0600 when others may read it.

    Raise FileNotFoundError when it does not exist.
    """
    content = path.read_bytes()
    if path.stat().st_mode & 0o077:
        log.warning("restricting a private file to mode 0600", extra={"path": str(path)})
        path.chmod(0o600)
    return content
