"""Reading the virtual size from the headers of images vmdisk made itself.

Only for our own disks, whose format is pinned in their record: this is
not format detection (nothing here guesses a format), just a cheaper way
than spawning ``qemu-img info`` to read one field on every status refresh.
"""

from __future__ import annotations

import struct
from pathlib import Path

_QCOW2_MAGIC = b"QFI\xfb"
_PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")


class HeaderMismatch(ValueError):
    """The file does not carry the header its pinned format promises."""


def _read(path: Path, length: int) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(length)
    if len(data) < length:
        raise HeaderMismatch(f"{path}: too short for its image header")
    return data


def qcow2_virtual_size(path: Path) -> int:
    """Bytes 24..31 of a qcow2 header, big-endian."""
    header = _read(path, 32)
    if header[:4] != _QCOW2_MAGIC:
        raise HeaderMismatch(f"{path}: no qcow2 header")
    return int(struct.unpack_from(">Q", header, 24)[0])


def parallels_virtual_size(path: Path) -> int:
    """``nb_sectors`` (little-endian, at byte 36) of a parallels header, in bytes."""
    header = _read(path, 44)
    if header[:16] not in _PARALLELS_MAGICS:
        raise HeaderMismatch(f"{path}: no parallels header")
    return int(struct.unpack_from("<Q", header, 36)[0]) * 512
