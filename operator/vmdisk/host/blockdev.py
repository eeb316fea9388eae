"""Block-device chores: zeroing a range, growing a filesystem that fills a device."""

from __future__ import annotations

from pathlib import Path

from .run import CommandError, run

_ALIGN = 4096  # blkdiscard needs offsets aligned to the logical sector size


def zero(device: Path, offset: int = 0, *, timeout: float = 3600.0) -> None:
    """Write zeroes from ``offset`` (rounded down to 4 KiB) to the end of ``device``.

    ``blkdiscard --zeroout`` uses the device's write-zeroes support where it
    has one, so this is fast on thin and SSD-backed storage.
    """
    start = offset - offset % _ALIGN
    run(["blkdiscard", "--zeroout", "--offset", str(start), str(device)], timeout=timeout)


def grow_filesystem(device: Path, filesystem: str, *, timeout: float = 3600.0) -> bool:
    """Grow the (unmounted) filesystem on ``device`` to fill it; False when it cannot.

    ext2/3/4 grow offline, after a forced check as resize2fs demands (Nova's
    resize2fs step).  XFS grows only while mounted, so it is left to the
    guest (``xfs_growfs``).
    """
    if not filesystem.startswith("ext"):
        return False
    try:
        run(["e2fsck", "-f", "-p", str(device)], timeout=timeout)
    except CommandError as exc:
        if exc.returncode != 1:  # 1: errors were corrected
            raise
    run(["resize2fs", str(device)], timeout=timeout)
    return True
