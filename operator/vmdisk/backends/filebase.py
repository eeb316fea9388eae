"""What the file-based backends (raw, qcow2, ploop) share.

Each disk is a directory under ``<state>/disks/<namespace>/<name>/`` holding
the image and its pinned record.  A disk is built in a sibling ``.partial``
directory and renamed into place only when complete, so a crash at any
point leaves either nothing or a finished disk (plus a partial directory
the next create removes).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Literal

from ..errors import DiskExists, FormatConflict, InvalidSpec, UnsupportedOperation
from ..host.files import (
    allocate,
    allocated_bytes,
    fsync_dir,
    raise_if_no_space,
    remove_on_error,
    remove_path,
)
from ..host.imagelocks import qemu_lock_held
from ..host.mkfs import make_filesystem
from ..host.safeopen import ensure_dir
from ..layout import StateLayout
from .base import Blank, CreateRequest, DiskLocation, DiskRef, DiskState, FromStore, Readable
from .record import DiskRecord, disks_on_host, read_record, write_record


class FileBackend(ABC):
    """Common lifecycle of a disk that is one image file in its own directory."""

    name: ClassVar[str]
    format: ClassVar[str]
    data_name: ClassVar[str] = "disk"
    fs_driver: ClassVar[Literal["loop", "nbd", "ploop"]]
    shared: ClassVar[bool] = False
    preallocations: ClassVar[frozenset[str]]

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout

    # -- paths ---------------------------------------------------------------
    def directory(self, ref: DiskRef) -> Path:
        return self.layout.disk_dir(ref.namespace, ref.name)

    def data_path(self, ref: DiskRef) -> Path:
        return self.directory(ref) / self.data_name

    def location(self, ref: DiskRef) -> DiskLocation:
        return DiskLocation(
            type="file", path=str(self.data_path(ref)), format=self.format, fs_driver=self.fs_driver
        )

    # -- lifecycle -----------------------------------------------------------
    def state(self, ref: DiskRef) -> DiskState | None:
        """The disk's state, None when absent; refuses data another backend made.

        The record, not the bytes, says what the data is: a raw disk kept with
        ``Retain`` whose guest wrote a qcow2 header is never read as qcow2 by
        a new VMDisk of the same name (Nova bug 1221190).
        """
        directory = self.directory(ref)
        record = self._own_record(directory)
        if record is None:
            return None
        data = self.data_path(ref)
        if not data.exists():
            return None
        return DiskState(
            format=record.format,
            virtual_size=self.virtual_size(data),
            actual_size=allocated_bytes(data),
            base_image=record.base_image,
            restored_snapshot=record.restored_snapshot,
        )

    def _own_record(self, directory: Path) -> DiskRecord | None:
        """The record of ``directory`` if it is this backend's, None when there is none."""
        try:
            record = read_record(directory)
        except (ValueError, TypeError) as exc:
            raise DiskExists(
                f"{directory} holds an unreadable disk record ({exc}); the data is left untouched"
            ) from None
        if record is None:
            return None
        if record.backend != self.name:
            raise DiskExists(
                f"{directory} holds a {record.backend} disk, not a {self.name} one (kept with "
                f"deletionPolicy: Retain?); it is never adopted as {self.name}: use backend "
                f"{record.backend}, another name, or remove the data"
            )
        if record.format != self.format:
            raise FormatConflict(
                f"{directory} records format {record.format}, but {self.name} disks are "
                f"{self.format}; it is never re-read as another format, and is left untouched"
            )
        return record

    @abstractmethod
    def virtual_size(self, data: Path) -> int:
        """The guest-visible size of this backend's image file."""

    def create(self, ref: DiskRef, request: CreateRequest) -> DiskState:
        if request.preallocation not in self.preallocations:
            raise InvalidSpec(
                f"spec.preallocation: {request.preallocation!r} is not supported by the "
                f"{self.name} backend (supported: {', '.join(sorted(self.preallocations))})"
            )
        if isinstance(request.content, FromStore):
            raise UnsupportedOperation(
                f"spec.source.image.url: {request.content.url.split('/')[0]}// images live in "
                f"Ceph and can only back rbd disks, not {self.name} ones",
                reason="SourceNotSupported",
            )
        final = self.directory(ref)
        if os.path.lexists(final):
            # state() found no complete disk of ours there: someone else's data.
            raise DiskExists(
                f"{final} already exists but holds no complete {self.name} disk made by "
                "vmdisk (no record, or no data file); it is left untouched: move it away, "
                "or choose another name"
            )
        partial = self.layout.partial_disk_dir(ref.namespace, ref.name)
        try:
            ensure_dir(partial.parent)  # refuses a planted symlink (UnsafePath)
            remove_path(partial)  # leftovers of a crashed attempt
            partial.mkdir(mode=0o700)
        except OSError as exc:
            raise_if_no_space(exc)  # a full filesystem is a condition, not a traceback
            raise
        with remove_on_error(partial):
            record = self._populate(partial, partial / self.data_name, request)
            record = replace(record, preallocation=request.preallocation)
            write_record(partial, record, new=True)
            fsync_dir(partial)  # the data's and the record's entries, before the rename
            os.rename(partial, final)
            fsync_dir(final.parent)
        state = self.state(ref)
        assert state is not None
        return state

    @abstractmethod
    def _populate(self, directory: Path, data: Path, request: CreateRequest) -> DiskRecord:
        """Write the disk's data into ``data`` (inside the partial directory)."""

    @abstractmethod
    def resize(self, ref: DiskRef, size: int) -> DiskState:
        """Grow the disk to ``size`` bytes; callers refuse shrinking first."""

    def delete(self, ref: DiskRef) -> None:
        remove_path(self.layout.partial_disk_dir(ref.namespace, ref.name))
        remove_path(self.directory(ref))

    def readable(self, ref: DiskRef, snapshot: str | None = None) -> Readable:
        return Readable(self.data_path(ref), self.format)

    def inventory(self) -> list[DiskRef]:
        return list(disks_on_host(self.layout.disks_dir, self.name))

    def snapshots(self, ref: DiskRef) -> tuple[str, ...]:
        return ()

    def holders(self, ref: DiskRef) -> list[str]:
        if qemu_lock_held(self.data_path(ref)):
            return [f"a process holding QEMU's image lock on {self.data_path(ref)}"]
        return []

    # -- helpers for subclasses ---------------------------------------------
    def _blank_filesystem(self, directory: Path, blank: Blank, size: int) -> Path | None:
        """A raw scratch image holding a fresh filesystem, or None for no filesystem."""
        if blank.filesystem is None:
            return None
        scratch = directory / "mkfs.raw"
        with open(scratch, "wb") as handle:
            handle.truncate(size)
        make_filesystem(scratch, blank.filesystem)
        return scratch

    @staticmethod
    def _preallocate(data: Path, size: int, preallocation: str) -> None:
        """``falloc`` reserves the blocks; ``full`` writes zeroes into every hole."""
        if preallocation in ("falloc", "full"):
            allocate(data, size, zero_fill=preallocation == "full")

    def _preallocation(self, ref: DiskRef) -> str:
        """The preallocation pinned at creation (``none`` for disks made before it was)."""
        record = read_record(self.directory(ref))
        return record.preallocation if record is not None else "none"

    def _mark_restored(self, ref: DiskRef, snapshot: str) -> None:
        record = read_record(self.directory(ref))
        assert record is not None
        write_record(self.directory(ref), record.with_restored(snapshot))
