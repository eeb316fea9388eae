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

from ..host.files import atomic_write
from .base import DiskRef

RECORD_NAME = "disk.json"


@dataclass(frozen=True)
class DiskRecord:
    backend: str
    format: str
    base_image: str | None = None
    base_path: str | None = None
    restored_snapshot: str | None = None

    def with_restored(self, snapshot: str) -> DiskRecord:
        return replace(self, restored_snapshot=snapshot)


def read_record(directory: Path) -> DiskRecord | None:
    """The disk's record, or None when the disk does not exist (complete)."""
    try:
        data = json.loads((directory / RECORD_NAME).read_text())
    except FileNotFoundError:
        return None
    return DiskRecord(**data)


def write_record(directory: Path, record: DiskRecord) -> None:
    atomic_write(directory / RECORD_NAME, json.dumps(asdict(record), indent=1, sort_keys=True))


def bases_in_use(disks_dir: Path) -> set[str]:
    """Ids of cache entries that file disks under ``disks_dir`` use as backing files.

    Partial (still being built) disks count too: their overlay may already
    point at the entry.
    """
    used: set[str] = set()
    for path in disks_dir.glob(f"*/*/{RECORD_NAME}"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("base_path") and data.get("base_image"):
            used.add(data["base_image"])
    return used


def disks_on_host(disks_dir: Path, backend: str) -> Iterator[DiskRef]:
    """The complete file disks of ``backend`` under ``disks_dir`` (partials excluded)."""
    for path in sorted(disks_dir.glob(f"*/*/{RECORD_NAME}")):
        name, namespace = path.parent.name, path.parent.parent.name
        record = read_record(path.parent)
        if not name.startswith(".") and record is not None and record.backend == backend:
            yield DiskRef(namespace, name)
