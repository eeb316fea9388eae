"""Inter-process file locks (``flock``), so two vmdisk processes never race."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import TemporaryError, UnsafePath
from .safeopen import ensure_dir


class LockTimeout(TemporaryError):
    reason = "LockBusy"


@contextmanager
def file_lock(path: Path, *, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block.

    flock locks die with the process, so a crashed holder never leaves a
    stale lock behind.  With ``timeout`` a busy lock raises LockTimeout.
    """
    ensure_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"lock file {path} is a symbolic link; remove it") from None
        raise
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline else 0))
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise LockTimeout(f"lock {path.name} is held by another process") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
