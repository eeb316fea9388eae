"""Disks made by the engine, with the XML the engine rendered, open in a real QEMU.

This is the end-to-end proof for local mode: manifest → engine → status.libvirtXML
→ libvirtd starts a guest → QEMU's ``query-block`` names the engine's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import Manifest, sha256_of
from libvirtd import boot_and_inspect
from vmdisk.api.vmdisk import VMDisk
from vmdisk.local.runner import LocalRunner

pytestmark = pytest.mark.libvirtd


@pytest.mark.parametrize(
    ("backend", "qemu_format"), [("qcow2", "qcow2"), ("raw", "raw"), ("ploop", "parallels")]
)
def test_engine_disk_boots_with_rendered_xml(
    libvirt_system: Any,
    runner: LocalRunner,
    disk: Manifest,
    image_dir: Path,
    backend: str,
    qemu_format: str,
) -> None:
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    (obj,) = runner.apply([disk("boot", backend, source=source, size="32Mi")])
    assert isinstance(obj, VMDisk) and obj.status is not None
    assert obj.status.phase == "Ready", obj.status.conditions
    xml = obj.status.libvirt_xml or ""

    opened = boot_and_inspect(libvirt_system, xml)

    assert opened[0].filename == obj.status.path
    assert opened[0].format == qemu_format
    if backend == "qcow2":  # the overlay reads through to the node's cached base
        assert Path(opened[1].filename).name == obj.status.base_image
        assert opened[1].format == "qcow2"
