"""QEMU, started by a real libvirtd, opens the disks our XML describes.

Proof is QEMU's own word: ``query-block`` on the running guest names the
image files and the format driver it opened them with.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from libvirtd import boot_and_inspect, boot_and_query
from vmdisk.api.vmdisk import IoTune, LibvirtSpec
from vmdisk.backends.base import DiskLocation
from vmdisk.libvirt import render_disk

pytestmark = pytest.mark.libvirtd

MiB = 1024 * 1024


def qemu_img_create(path: Path, fmt: str, size: int, backing: Path | None = None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "raw"]
    subprocess.run([*argv, str(path), str(size)], check=True, timeout=30)
    return path


def leftover_domains(conn: Any) -> list[str]:
    return [d.name() for d in conn.listAllDomains() if d.name().startswith("vmdisk-boot-")]


def test_qemu_opens_qcow2_overlay_and_its_raw_base(libvirt_system: Any, tmp_path: Path) -> None:
    base = qemu_img_create(tmp_path / "base.raw", "raw", 16 * MiB)
    disk = qemu_img_create(tmp_path / "disk.qcow2", "qcow2", 32 * MiB, backing=base)

    xml = render_disk(DiskLocation(type="file", path=str(disk), format="qcow2"), LibvirtSpec())

    assert boot_and_query(libvirt_system, xml) == [str(disk), str(base)]
    assert leftover_domains(libvirt_system) == []


def test_qemu_opens_raw_disk_on_scsi_with_limits(libvirt_system: Any, tmp_path: Path) -> None:
    disk = qemu_img_create(tmp_path / "disk.raw", "raw", 16 * MiB)
    spec = LibvirtSpec(
        bus="scsi", unit=2, boot_order=1, cache="writeback", iotune=IoTune(read_iops_sec=500)
    )

    xml = render_disk(DiskLocation(type="file", path=str(disk), format="raw"), spec)

    assert [(i.filename, i.format) for i in boot_and_inspect(libvirt_system, xml)] == [
        (str(disk), "raw")
    ]


def test_qemu_opens_ploop_root_hds_as_parallels(libvirt_system: Any, tmp_path: Path) -> None:
    bundle = tmp_path / "ploop"
    bundle.mkdir()
    root = qemu_img_create(bundle / "root.hds", "parallels", 64 * MiB)

    xml = render_disk(DiskLocation(type="file", path=str(root), format="parallels"), LibvirtSpec())

    assert [(i.filename, i.format) for i in boot_and_inspect(libvirt_system, xml)] == [
        (str(root), "parallels")
    ]
    assert leftover_domains(libvirt_system) == []
