"""``status.libvirtFilesystemXML``: the ``<filesystem>`` a container (LXC) mounts as its root.

Published for file and block disks, absent for network ones.  libvirt's own
schema and parser judge each element (``validate_disk_xml``).  This machine's
libvirtd has only the QEMU driver, whose domains cannot host a ``type='file'``
filesystem (that is LXC's), so no container is started here.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt  # noqa: F401  (python3-libvirt from scripts/setup.sh)
import pytest

from conftest import Manifest
from test_backends import apply, status_of
from vmdisk.backends.base import DiskLocation, NetworkHost
from vmdisk.libvirt import container_filesystem, validate_disk_xml
from vmdisk.local.runner import LocalRunner

DRIVERS = {"raw": ("loop", "raw"), "qcow2": ("nbd", "qcow2"), "ploop": ("ploop", "ploop")}


@pytest.mark.parametrize("backend", sorted(DRIVERS))
def test_file_disks_publish_a_filesystem_libvirt_accepts(
    runner: LocalRunner, disk: Manifest, backend: str
) -> None:
    (obj,) = apply(
        runner, disk("root", backend, source={"blank": {"filesystem": "ext4"}}, size="16Mi")
    )
    st = status_of(obj)
    assert st.phase == "Ready" and st.libvirt_filesystem_xml is not None
    element = ET.fromstring(st.libvirt_filesystem_xml)
    driver, fmt = DRIVERS[backend]
    assert (element.get("type"), element.find("driver").attrib) == (  # type: ignore[union-attr]
        "file",
        {"type": driver, "format": fmt},
    )
    source = element.find("source").get("file")  # type: ignore[union-attr]
    # ploop mounts the bundle directory; the others the image file itself.
    expected = Path(st.path or "").parent if backend == "ploop" else Path(st.path or "")
    assert source == str(expected) and Path(source).exists()
    assert element.find("target").get("dir") == "/"  # type: ignore[union-attr]
    validate_disk_xml(st.libvirt_filesystem_xml)


def test_block_disks_mount_their_device_and_network_disks_have_none() -> None:
    block = container_filesystem(DiskLocation(type="block", path="/dev/vg0/disk", format="raw"))
    assert block is not None and '<source dev="/dev/vg0/disk"' in block
    validate_disk_xml(block)
    rbd = DiskLocation(
        type="network", path="vms/disk", format="raw", protocol="rbd", hosts=(NetworkHost("mon"),)
    )
    assert container_filesystem(rbd) is None
