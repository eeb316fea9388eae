"""The small metadata file pinned next to each file-based disk.

The on-disk format is written once at creation and never re-derived from
the bytes afterwards: a guest can write a qcow2 header into a raw disk, and
re-probing would then hand it the host (Nova bug 1221190).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..host.files import atomic_write, write_new
from ..layout import StateLayout
from .base import DiskRef

RECORD_NAME = "disk.json"


@dataclass(frozen=True)
class DiskRecord:
    backend: str
    format: str
    base_image: str | None = None
    base_path: str | None = None
    restored_snapshot: str | None = None
    # Pinned like the format: grows and restores allocate the same way.
    preallocation: str = "none"

    def with_restored(self, snapshot: str) -> DiskRecord:
        return replace(self, restored_snapshot=snapshot)


def read_record(directory: Path) -> DiskRecord | None:
    """The disk's record, or None when the disk does not exist (complete)."""
    try:
        data = json.loads((directory / RECORD_NAME).read_text())
    except FileNotFoundError:
        return None
    return DiskRecord(**data)


def write_record(directory: Path, record: DiskRecord, *, new: bool = False) -> None:
    """Replace the record atomically; ``new``: create it in a directory no reader sees yet
    (a disk's partial directory), flushed, its entry made durable by the caller's
    fsync of ``directory``."""
    text = json.dumps(asdict(record), indent=1, sort_keys=True)
    if new:
        write_new(directory / RECORD_NAME, text.encode())
    else:
        atomic_write(directory / RECORD_NAME, text)


def disks_on_host(disks_dir: Path, backend: str) -> Iterator[DiskRef]:
    """The data under ``disks_dir`` that may be ``backend``'s, found from the data itself.

    Every entry of ``disks/<namespace>/`` counts, recorded or not: a
    directory is ``backend``'s when its record says so, and everyone's (any
    file backend may have made it) when it has no readable record.  A
    half-made ``.<name>.partial`` directory counts as disk ``<name>``.
    """
    for entry in sorted(disks_dir.glob("*/*")):
        if entry.parent.name.startswith("."):
            continue
        name = StateLayout.disk_name_of(entry.name)
        try:
            record = read_record(entry) if entry.is_dir() else None
        except (OSError, ValueError, TypeError):
            record = None  # unreadable: unowned data all the same
        if record is None or record.backend == backend:
            yield DiskRef(entry.parent.name, name)
