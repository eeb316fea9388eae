"""The device rules (``vmdisk.libvirt.check_device``) against real domain starts.

Every device/bus combination the model accepts is started in the real
libvirtd + QEMU (tests/libvirtd.py), on a file disk and on a block device
(a loop device); our verdict must be libvirt's.  Then the engine refuses the
unstartable ones before making any data.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from pydantic import ValidationError

from conftest import Manifest
from libvirtd import boot_and_inspect
from test_backends import apply, ready_reason, status_of
from vmdisk.api.vmdisk import LibvirtSpec
from vmdisk.backends.base import DiskLocation
from vmdisk.errors import InvalidSpec
from vmdisk.libvirt import _disk_xml, check_device
from vmdisk.local.runner import LocalRunner

DEVICES = ("disk", "cdrom", "lun")
BUSES = ("virtio", "scsi", "sata", "ide", "usb")


@pytest.fixture(scope="module")
def loop_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    image = tmp_path_factory.mktemp("loop") / "block.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "16M"], check=True)
    attached = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True
    )
    if attached.returncode != 0:
        pytest.skip(f"no loop devices in this kernel: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


def _starts(conn: Any, xml: str) -> bool:
    try:
        boot_and_inspect(conn, xml)
    except libvirt.libvirtError:
        return False
    return True


def _ours(location: DiskLocation, spec: LibvirtSpec) -> bool:
    try:
        check_device(location, spec)
    except InvalidSpec:
        return False
    return True


@pytest.mark.libvirtd
@pytest.mark.parametrize("kind", ["file", "block"])
def test_rules_agree_with_real_domain_starts(
    libvirt_system: Any, tmp_path: Path, loop_device: str, kind: str
) -> None:
    path = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "16M"], check=True)
    location = DiskLocation(
        type="file" if kind == "file" else "block",
        path=str(path) if kind == "file" else loop_device,
        format="raw",
    )
    disagreements, refused = [], []
    for device, bus in itertools.product(DEVICES, BUSES):
        try:
            spec = LibvirtSpec(device=device, bus=bus, cache="writeback")
        except ValidationError:
            continue  # refused by the model already (lun off the scsi bus)
        ours, real = _ours(location, spec), _starts(libvirt_system, _disk_xml(location, spec))
        if ours != real:
            disagreements.append(f"{device}/{bus}: ours {ours}, libvirt {real}")
        if not real:
            refused.append(f"{device}/{bus}")
    assert disagreements == []
    assert refused == ["cdrom/virtio", "lun/scsi"]  # the rule list is not empty


@pytest.mark.parametrize(
    ("libvirt_spec", "field"),
    [
        ({"device": "cdrom"}, "spec.libvirt.bus"),
        ({"device": "lun", "bus": "scsi"}, "spec.libvirt.device"),
    ],
)
def test_unstartable_devices_never_go_ready_and_make_no_data(
    runner: LocalRunner, disk: Manifest, state_dir: Path, libvirt_spec: dict[str, str], field: str
) -> None:
    (obj,) = apply(
        runner, disk("odd", "raw", source={"blank": {}}, size="1Mi", libvirt=libvirt_spec)
    )
    st = status_of(obj)
    assert (st.phase, ready_reason(obj)) == ("Failed", "InvalidSpec")
    ready = next(c for c in st.conditions if c.type == "Ready")
    assert ready.message.startswith(field)
    assert not (state_dir / "disks" / "vms" / "odd").exists()
