"""The raw backend (Nova's Flat): a plain, sparse image file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from ..host import qemu_img
from ..host.files import remove_path, sparse_copy
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
from .copysnap import CopySnapshots
from .record import DiskRecord


class RawBackend(CopySnapshots):
    name: ClassVar[str] = "raw"
    format: ClassVar[str] = "raw"
    fs_driver: ClassVar[Literal["loop", "nbd", "ploop"]] = "loop"
    preallocations: ClassVar[frozenset[str]] = frozenset({"none", "falloc", "full"})

    def _populate(self, directory: Path, data: Path, request: CreateRequest) -> DiskRecord:
        content = request.content
        if isinstance(content, Blank):
            scratch = self._blank_filesystem(directory, content, request.size)
            if scratch is not None:
                os.rename(scratch, data)
                self._preallocate(data, request.size, request.preallocation)
            else:
                options: dict[str, str] = {}
                if request.preallocation != "none":
                    options["preallocation"] = request.preallocation
                qemu_img.create(data, "raw", request.size, options=options)
            return DiskRecord(backend=self.name, format="raw")
        assert isinstance(content, FromImage | FromDisk)
        self._copy(content.source, data, request)
        self._grow(data, request.size)
        self._preallocate(data, request.size, request.preallocation)
        # A raw copy does not keep its base in use, so no base_path.
        return DiskRecord(backend=self.name, format="raw", base_image=content.base_id)

    @staticmethod
    def _copy(source: Readable, data: Path, request: CreateRequest) -> None:
        """Sparse-aware copy; qemu-img converts anything that is not plain raw."""
        if source.format == "raw" and source.snapshot is None:
            sparse_copy(source.path, data)
        else:
            remove_path(data)
            qemu_img.convert(
                source.path,
                source.format,
                data,
                "raw",
                snapshot=source.snapshot,
                progress=request.progress,
            )

    @staticmethod
    def _grow(data: Path, size: int) -> None:
        if data.stat().st_size < size:
            os.truncate(data, size)

    def virtual_size(self, data: Path) -> int:
        return data.stat().st_size

    def _from_raw(self, raw: Path, target: Path) -> None:
        sparse_copy(raw, target)

    def prepare_online_grow(self, ref: DiskRef, size: int) -> None:
        """Nothing: QEMU extends the file it has open itself."""

    def resize(self, ref: DiskRef, size: int) -> DiskState:
        data = self.data_path(ref)
        self._grow(data, size)
        self._preallocate(data, size, self._preallocation(ref))
        state = self.state(ref)
        assert state is not None
        return state


PLUGIN = BackendPlugin(
    RawBackend.name,
    ClassParameters,
    lambda settings, layout: RawBackend(layout),
    builtin_class=True,
)
