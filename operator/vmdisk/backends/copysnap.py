"""Snapshots as sparse (or reflinked) copies, for raw and ploop disks.

Offline, a copy of the disk file; under a running domain, a copy QEMU makes
at one point in time (libvirt's backup job) while the guest runs on.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

from ..errors import PermanentError
from ..host.files import allocated_bytes, fsync_dir, remove_on_error, remove_path, sparse_copy
from ..host.safeopen import ensure_dir
from .base import DiskRef, DiskState, PointInTime, Readable
from .filebase import FileBackend


class SnapshotMissing(PermanentError):
    reason = "SnapshotMissing"


class CopySnapshots(FileBackend):
    """Snapshots kept as ``snapshots/<name>`` copies beside the disk."""

    def _snapshot_dir(self, ref: DiskRef) -> Path:
        return self.directory(ref) / "snapshots"

    def _snapshot_path(self, ref: DiskRef, name: str) -> Path:
        return self._snapshot_dir(ref) / name

    def create_snapshot(self, ref: DiskRef, name: str) -> int:
        data = self.data_path(ref)
        return self._snapshot_from(ref, name, lambda tmp: sparse_copy(data, tmp))

    def create_live_snapshot(self, ref: DiskRef, name: str, live: PointInTime) -> int:
        """A point-in-time copy made by the running QEMU (libvirt's backup job)."""

        def fill(tmp: Path) -> None:
            # QEMU writes unallocated ranges out as zero extents; re-reading its
            # raw output into the snapshot's own format keeps the snapshot thin.
            full = tmp.with_name(f"{tmp.name}.backup")
            remove_path(full)
            with remove_on_error(full):
                live.copy(full, "raw")
                self._from_raw(full, tmp)
            remove_path(full)

        return self._snapshot_from(ref, name, fill)

    @abstractmethod
    def _from_raw(self, raw: Path, target: Path) -> None:
        """Write the raw image ``raw`` into ``target`` in this backend's format, sparsely."""

    def _snapshot_from(self, ref: DiskRef, name: str, fill: Callable[[Path], object]) -> int:
        """Snapshot ``name`` as the file ``fill`` writes; all or nothing."""
        target = self._snapshot_path(ref, name)
        if target.exists():
            return allocated_bytes(target)
        ensure_dir(target.parent)
        tmp = target.with_name(f".{name}.partial")
        remove_path(tmp)
        with remove_on_error(tmp):
            fill(tmp)
            os.rename(tmp, target)
            fsync_dir(target.parent)
        return allocated_bytes(target)

    def remove_snapshot(self, ref: DiskRef, name: str, *, ignore_missing: bool = False) -> None:
        target = self._snapshot_path(ref, name)
        if not target.exists():
            if ignore_missing:
                return
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")
        remove_path(target)

    def rollback(self, ref: DiskRef, name: str) -> DiskState:
        source = self._snapshot_path(ref, name)
        if not source.exists():
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")
        data = self.data_path(ref)
        tmp = data.with_name(f".{data.name}.rollback")
        remove_path(tmp)
        with remove_on_error(tmp):
            sparse_copy(source, tmp)
            self._preallocate(tmp, self.virtual_size(tmp), self._preallocation(ref))
            os.replace(tmp, data)  # atomic: the disk is the old or the restored one
            fsync_dir(data.parent)
        self._mark_restored(ref, name)
        state = self.state(ref)
        assert state is not None
        return state

    def snapshots(self, ref: DiskRef) -> tuple[str, ...]:
        directory = self._snapshot_dir(ref)
        if not directory.is_dir():
            return ()
        return tuple(sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")))

    def readable(self, ref: DiskRef, snapshot: str | None = None) -> Readable:
        if snapshot is None:
            return Readable(self.data_path(ref), self.format)
        path = self._snapshot_path(ref, snapshot)
        if not path.exists():
            raise SnapshotMissing(f"snapshot {snapshot!r} of disk {ref} does not exist")
        return Readable(path, self.format)
