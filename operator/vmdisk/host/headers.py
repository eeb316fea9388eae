"""Reading the virtual size and backing file from image headers.

Sizes are read only from our own disks, whose format is pinned in their
record: this is not format detection (nothing here guesses a format), just
a cheaper way than spawning ``qemu-img info`` to read one field on every
status refresh.  Backing files are read from every qcow2 under the state
directory, so that the cache never removes a base an image still names.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from ..errors import DiskCorrupt

_QCOW2_MAGIC = b"QFI\xfb"
_PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
_MAX_BACKING_NAME = 1023


class HeaderMismatch(DiskCorrupt):
    """The file does not carry the header its pinned format promises.

    A disk error, not a programming one: it becomes that disk's ``Failed``
    condition and leaves every other object alone.
    """


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


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file name a qcow2 header names (offset 8, length 16), or None.

    Read from the bytes, not from any record: the header is what QEMU
    follows.  Names are bounded as QEMU bounds them (1023 bytes).
    """
    header = _read(path, 20)
    if header[:4] != _QCOW2_MAGIC:
        raise HeaderMismatch(f"{path}: no qcow2 header")
    offset = int(struct.unpack_from(">Q", header, 8)[0])
    length = int(struct.unpack_from(">I", header, 16)[0])
    if offset == 0 or length == 0:
        return None
    if length > _MAX_BACKING_NAME:
        raise HeaderMismatch(f"{path}: backing file name of {length} bytes")
    with open(path, "rb") as handle:
        handle.seek(offset)
        name = handle.read(length)
    if len(name) < length:
        raise HeaderMismatch(f"{path}: backing file name beyond the end of the file")
    return name.decode("utf-8", "surrogateescape")


def is_qcow2(path: Path) -> bool:
    """True when the file starts with the qcow2 magic (short files are not)."""
    with open(path, "rb") as handle:
        return handle.read(4) == _QCOW2_MAGIC


def parallels_virtual_size(path: Path) -> int:
    """``nb_sectors`` (little-endian, at byte 36) of a parallels header, in bytes."""
    header = _read(path, 44)
    if header[:16] not in _PARALLELS_MAGICS:
        raise HeaderMismatch(f"{path}: no parallels header")
    return int(struct.unpack_from("<Q", header, 36)[0]) * 512


def backing_files(roots: Iterable[Path]) -> set[Path]:
    """Every file that a qcow2 image under ``roots`` names as its backing file.

    The truth about which bases are in use is in the images themselves, not
    in any record beside them: a disk whose record is lost still reads its
    base.  Symlinks are not followed; unreadable files are skipped.
    """
    found: set[Path] = set()
    for root in roots:
        for directory, _dirs, files in os.walk(root):
            for file_name in files:
                path = Path(directory, file_name)
                try:
                    if not stat.S_ISREG(path.lstat().st_mode) or not is_qcow2(path):
                        continue
                    name = qcow2_backing_file(path)
                except (OSError, HeaderMismatch):
                    continue
                if name is not None:
                    found.add(_resolve_backing(path, name))
    return found


def _resolve_backing(image: Path, name: str) -> Path:
    """QEMU's reading of a backing name: relative to the image's directory."""
    name = name.removeprefix("file:")
    return Path(os.path.realpath(image.parent / name))
