"""The qcow2 backend: a copy-on-write overlay on the node's cached base image."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from ..host import qemu_img
from ..host.files import remove_path
from ..host.headers import qcow2_virtual_size
from ..layout import StateLayout
from .base import (
    BackendPlugin,
    Blank,
    ClassParameters,
    CreateRequest,
    DiskRef,
    DiskState,
    FromDisk,
    FromImage,
    Readable,
)
from .copysnap import SnapshotMissing
from .filebase import FileBackend
from .record import DiskRecord
from .templates import ImageTemplates


def _create_options(preallocation: str, *, with_backing: bool) -> dict[str, str]:
    if preallocation == "none":
        return {}
    options = {"preallocation": preallocation}
    if with_backing:
        # qemu only preallocates an overlay with subclusters (extended L2).
        options["extended_l2"] = "on"
    return options


class Qcow2Backend(FileBackend):
    name: ClassVar[str] = "qcow2"
    format: ClassVar[str] = "qcow2"
    fs_driver: ClassVar[Literal["loop", "nbd", "ploop"]] = "nbd"
    preallocations: ClassVar[frozenset[str]] = frozenset({"none", "metadata", "falloc", "full"})

    def __init__(self, layout: StateLayout) -> None:
        super().__init__(layout)
        self._templates = ImageTemplates()

    def _make_image(
        self,
        data: Path,
        size: int,
        preallocation: str,
        backing: tuple[Path, str] | None = None,
    ) -> None:
        """``qemu-img create`` of a plain qcow2 (an overlay of ``backing``), or a copy of one."""
        path, fmt = backing if backing is not None else (None, None)
        options = _create_options(preallocation, with_backing=backing is not None)

        def create(target: Path) -> None:
            qemu_img.create(
                target, "qcow2", size, backing=path, backing_format=fmt, options=options
            )

        if options:
            create(data)  # preallocated: the allocation is the point, never a copy
        else:
            self._templates.make((path, fmt, size), data, create)

    def _populate(self, directory: Path, data: Path, request: CreateRequest) -> DiskRecord:
        content = request.content
        if isinstance(content, Blank):
            scratch = self._blank_filesystem(directory, content, request.size)
            if scratch is None:
                self._make_image(data, request.size, request.preallocation)
            else:
                options = _create_options(request.preallocation, with_backing=False)
                qemu_img.convert(scratch, "raw", data, "qcow2", options=options)
                remove_path(scratch)
            return DiskRecord(backend=self.name, format="qcow2")
        if isinstance(content, FromImage):
            # O(1) in the image size: only an overlay is written.
            image = content.image
            size = max(request.size, image.virtual_size)
            self._make_image(data, size, request.preallocation, (image.path, image.format))
            return DiskRecord(
                backend=self.name, format="qcow2", base_image=image.id, base_path=str(image.path)
            )
        assert isinstance(content, FromDisk)
        base = content.base
        # Keep sharing the source's base: only clusters that differ are copied.
        qemu_img.convert(
            content.source.path,
            content.source.format,
            data,
            "qcow2",
            snapshot=content.source.snapshot,
            target_backing=base.path if base else None,
            target_backing_format=base.format if base else None,
            progress=request.progress,
        )
        if qemu_img.info(data, "qcow2").virtual_size < request.size:
            qemu_img.resize(data, "qcow2", request.size)
        return DiskRecord(
            backend=self.name,
            format="qcow2",
            base_image=base.id if base else None,
            base_path=str(base.path) if base else None,
        )

    def virtual_size(self, data: Path) -> int:
        return qcow2_virtual_size(data)

    def prepare_online_grow(self, ref: DiskRef, size: int) -> None:
        """Nothing: only the QEMU that has the image open may rewrite its header."""

    def resize(self, ref: DiskRef, size: int) -> DiskState:
        qemu_img.resize(self.data_path(ref), "qcow2", size, preallocation=self._preallocation(ref))
        state = self.state(ref)
        assert state is not None
        return state

    # -- internal snapshots ---------------------------------------------------
    def snapshots(self, ref: DiskRef) -> tuple[str, ...]:
        data = self.data_path(ref)
        if not data.exists():
            return ()
        return qemu_img.info(data, "qcow2").snapshots

    def create_snapshot(self, ref: DiskRef, name: str) -> int:
        data = self.data_path(ref)
        if name not in self.snapshots(ref):
            qemu_img.snapshot(data, "qcow2", "-c", name)
        return qemu_img.info(data, "qcow2").virtual_size

    def remove_snapshot(self, ref: DiskRef, name: str, *, ignore_missing: bool = False) -> None:
        if name not in self.snapshots(ref):
            if ignore_missing:
                return
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")
        qemu_img.snapshot(self.data_path(ref), "qcow2", "-d", name)

    def rollback(self, ref: DiskRef, name: str) -> DiskState:
        if name not in self.snapshots(ref):
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")
        qemu_img.snapshot(self.data_path(ref), "qcow2", "-a", name)
        self._mark_restored(ref, name)
        state = self.state(ref)
        assert state is not None
        return state

    def readable(self, ref: DiskRef, snapshot: str | None = None) -> Readable:
        if snapshot is not None and snapshot not in self.snapshots(ref):
            raise SnapshotMissing(f"snapshot {snapshot!r} of disk {ref} does not exist")
        return Readable(self.data_path(ref), "qcow2", snapshot)


PLUGIN = BackendPlugin(
    Qcow2Backend.name,
    ClassParameters,
    lambda settings, layout: Qcow2Backend(layout),
    builtin_class=True,
)
