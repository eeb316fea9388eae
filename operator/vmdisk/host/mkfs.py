"""Making a filesystem inside a disk image file."""

from __future__ import annotations

from pathlib import Path

from .run import run

_MKFS: dict[str, list[str]] = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
    "ext3": ["mkfs.ext3", "-q", "-F", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
}


def make_filesystem(path: Path, filesystem: str, *, timeout: float = 600.0) -> None:
    """Format the raw image file at ``path`` with ``filesystem``."""
    try:
        argv = _MKFS[filesystem]
    except KeyError:
        raise ValueError(f"unsupported filesystem {filesystem!r}") from None
    run([*argv, str(path)], timeout=timeout)
