"""The ploop backend: Virtuozzo's layout, a directory with ``root.hds``
(parallels format) and a ``DiskDescriptor.xml`` we generate.

QEMU opens ``root.hds`` with its parallels driver; Virtuozzo tools read the
descriptor.  qemu-img cannot resize parallels images, so growing copies the
data into a larger fresh image.
"""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import ClassVar, Literal

from ..host import qemu_img
from ..host.files import atomic_write, remove_on_error, remove_path
from ..host.headers import parallels_virtual_size
from ..host.run import Progress
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

DESCRIPTOR = "DiskDescriptor.xml"
_SECTOR = 512
_TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"  # ploop's fixed GUID of the base delta
_NO_PARENT = "{00000000-0000-0000-0000-000000000000}"


def render_descriptor(size: int, image_file: str, disk_uuid: str) -> str:
    """The DiskDescriptor.xml of a single-delta, expanding ploop disk."""
    sectors = size // _SECTOR
    root = ET.Element("Parallels_disk_image", Version="1.0")
    params = ET.SubElement(root, "Disk_Parameters")
    for tag, value in (
        ("Disk_size", sectors),
        ("Cylinders", max(1, sectors // (16 * 63))),
        ("Heads", 16),
        ("Sectors", 63),
        ("Padding", 0),
    ):
        ET.SubElement(params, tag).text = str(value)
    encryption = ET.SubElement(params, "Encryption")
    ET.SubElement(encryption, "Engine").text = "0"
    ET.SubElement(encryption, "Data").text = ""
    ET.SubElement(params, "UID").text = "{" + disk_uuid + "}"
    storage = ET.SubElement(ET.SubElement(root, "StorageData"), "Storage")
    ET.SubElement(storage, "Start").text = "0"
    ET.SubElement(storage, "End").text = str(sectors)
    ET.SubElement(storage, "Blocksize").text = "2048"
    image = ET.SubElement(storage, "Image")
    ET.SubElement(image, "GUID").text = _TOP_GUID
    ET.SubElement(image, "Type").text = "Compressed"  # ploop's word for expanding
    ET.SubElement(image, "File").text = image_file
    shot = ET.SubElement(ET.SubElement(root, "Snapshots"), "Shot")
    ET.SubElement(shot, "GUID").text = _TOP_GUID
    ET.SubElement(shot, "ParentGUID").text = _NO_PARENT
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


class PloopBackend(CopySnapshots):
    name: ClassVar[str] = "ploop"
    format: ClassVar[str] = "parallels"
    data_name: ClassVar[str] = "root.hds"
    fs_driver: ClassVar[Literal["loop", "nbd", "ploop"]] = "ploop"
    preallocations: ClassVar[frozenset[str]] = frozenset({"none"})

    def _populate(self, directory: Path, data: Path, request: CreateRequest) -> DiskRecord:
        content = request.content
        base: str | None = None
        if isinstance(content, Blank):
            scratch = self._blank_filesystem(directory, content, request.size)
            if scratch is None:
                qemu_img.create(data, "parallels", request.size)
            else:
                qemu_img.convert(scratch, "raw", data, "parallels")
                remove_path(scratch)
        else:
            assert isinstance(content, FromImage | FromDisk)
            base = content.base_id
            self._write_grown(content.source, data, request.size, request.progress)
        self._write_descriptor(directory, data)
        return DiskRecord(backend=self.name, format="parallels", base_image=base)

    @staticmethod
    def _write_grown(
        source: Readable, data: Path, size: int, progress: Progress | None = None
    ) -> None:
        """Copy ``source`` into a fresh parallels image of at least ``size`` bytes."""
        source_size = qemu_img.info(source.path, source.format).virtual_size
        qemu_img.create(data, "parallels", max(size, source_size))
        qemu_img.convert(
            source.path,
            source.format,
            data,
            "parallels",
            snapshot=source.snapshot,
            target_exists=True,
            target_is_zero=True,  # a fresh parallels image reads as zeros
            progress=progress,
        )

    @staticmethod
    def _write_descriptor(directory: Path, data: Path) -> None:
        size = parallels_virtual_size(data)
        descriptor = directory / DESCRIPTOR
        disk_uuid = str(uuid.uuid4())
        if descriptor.exists():  # keep the disk's identity across resizes
            uid = ET.parse(descriptor).findtext("Disk_Parameters/UID")
            if uid:
                disk_uuid = uid.strip("{}")
        atomic_write(descriptor, render_descriptor(size, data.name, disk_uuid))

    def virtual_size(self, data: Path) -> int:
        return parallels_virtual_size(data)

    def _from_raw(self, raw: Path, target: Path) -> None:
        qemu_img.convert(raw, "raw", target, "parallels")  # zero clusters stay unallocated

    def resize(self, ref: DiskRef, size: int) -> DiskState:
        data = self.data_path(ref)
        grown = data.with_name(f".{data.name}.grow")
        remove_path(grown)
        with remove_on_error(grown):
            self._write_grown(Readable(data, "parallels"), grown, size)
            os.replace(grown, data)
        self._write_descriptor(self.directory(ref), data)
        state = self.state(ref)
        assert state is not None
        return state


PLUGIN = BackendPlugin(
    PloopBackend.name,
    ClassParameters,
    lambda settings, layout: PloopBackend(layout),
    builtin_class=True,
)
