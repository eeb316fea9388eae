"""libvirt XML rendering: golden files, and libvirt's own schema as the judge.

Every rendered element must equal its file in tests/golden/ and pass
validation by the in-process ``test:///default`` driver. Regenerate the
golden files after an intended change with ``VMDISK_UPDATE_GOLDEN=1 pytest``
and review the diff.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from vmdisk.api.vmdisk import IoTune, LibvirtSpec
from vmdisk.backends.base import DiskLocation, NetworkHost
from vmdisk.errors import InvalidSpec
from vmdisk.libvirt import render_disk, render_filesystem, validate_disk_xml

GOLDEN = Path(__file__).parent / "golden"
SECRET = "2a5b08e6-fd3c-4b1f-8d5d-3e3f4b0c9a11"
QCOW2 = DiskLocation(type="file", path="/var/lib/vmdisk/disks/vms/web-root/disk", format="qcow2")
RAW = DiskLocation(type="file", path="/var/lib/vmdisk/disks/vms/data/disk", format="raw")
LVM = DiskLocation(type="block", path="/dev/vg0/vms_web-root", format="raw")
PLOOP = DiskLocation(
    type="file",
    path="/var/lib/vmdisk/disks/vms/ct/root.hds",
    format="parallels",
    fs_driver="ploop",
)
RBD = DiskLocation(
    type="network",
    path="vms/vms_web-root",
    format="raw",
    protocol="rbd",
    hosts=(NetworkHost("10.0.0.1", 6789), NetworkHost("[2001:db8::1]", 3300)),
    auth_username="vmdisk",
    secret_uuid=SECRET,
)

# golden file name -> how to render it
CASES: dict[str, Callable[[], str]] = {
    "qcow2-file-defaults.xml": lambda: render_disk(QCOW2, LibvirtSpec()),
    "raw-file-scsi-unit-boot.xml": lambda: render_disk(
        RAW, LibvirtSpec(bus="scsi", target="sdb", unit=1, boot_order=2, cache="writeback")
    ),
    "block-lvm-io-native.xml": lambda: render_disk(LVM, LibvirtSpec(io="native", cache="none")),
    "rbd-two-hosts-ipv6-auth.xml": lambda: render_disk(RBD, LibvirtSpec(cache="writeback")),
    "cdrom.xml": lambda: render_disk(
        DiskLocation(type="file", path="/srv/iso/installer.iso", format="raw"),
        LibvirtSpec(device="cdrom", bus="sata", boot_order=1),
    ),
    "iotune.xml": lambda: render_disk(
        QCOW2,
        LibvirtSpec(
            iotune=IoTune(read_bytes_sec=10_485_760, write_bytes_sec=5_242_880, total_iops_sec=500)
        ),
    ),
    "ploop-file.xml": lambda: render_disk(PLOOP, LibvirtSpec()),
    "fs-raw-loop.xml": lambda: render_filesystem(RAW, "/"),
    "fs-qcow2-nbd.xml": lambda: render_filesystem(QCOW2, "/"),
    "fs-ploop.xml": lambda: render_filesystem(PLOOP, "/"),
    "fs-block.xml": lambda: render_filesystem(LVM, "/srv/data"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_render_matches_golden_file(name: str) -> None:
    rendered = CASES[name]() + "\n"
    golden = GOLDEN / name
    if os.environ.get("VMDISK_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_xml_is_valid_for_libvirt(name: str) -> None:
    validate_disk_xml(CASES[name]())


def test_golden_directory_has_no_stale_files() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.xml")) == sorted(CASES)


def test_rendering_is_deterministic() -> None:
    assert all(render() == render() for render in CASES.values())


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ('bus="virtio"', 'bus="floppy-ish"'),
        ('cache="none"', 'cache="sometimes"'),
        ('io="native"', 'io="whenever"'),
        ('type="qcow2"', 'type="qcow3"'),
        ("<target dev", "<bogus /><target dev"),
    ],
)
def test_validation_rejects_what_libvirt_rejects(good: str, bad: str) -> None:
    # Guards the guard: were validation a no-op, the tests above would prove nothing.
    xml = render_disk(QCOW2, LibvirtSpec())
    assert good in xml
    with pytest.raises(ValueError, match="validate"):
        validate_disk_xml(xml.replace(good, bad, 1))


def test_validation_rejects_bracketed_ipv6_host() -> None:
    xml = render_disk(RBD, LibvirtSpec())
    with pytest.raises(ValueError):
        validate_disk_xml(xml.replace("2001:db8::1", "[2001:db8::1]"))


def test_validation_rejects_malformed_xml() -> None:
    with pytest.raises(ValueError, match="well-formed"):
        validate_disk_xml("<disk type='file'>")


def test_ipv6_host_is_bare_and_ipv4_untouched() -> None:
    hosts = ET.fromstring(render_disk(RBD, LibvirtSpec())).findall("source/host")
    assert [(h.get("name"), h.get("port")) for h in hosts] == [
        ("10.0.0.1", "6789"),
        ("2001:db8::1", "3300"),
    ]


def test_rbd_without_auth_has_no_auth_element() -> None:
    location = DiskLocation(type="network", path="vms/img", format="raw", protocol="rbd")
    xml = render_disk(location, LibvirtSpec())
    assert ET.fromstring(xml).find("source/auth") is None
    validate_disk_xml(xml)


def test_rbd_user_without_secret_is_a_spec_error() -> None:
    location = DiskLocation(
        type="network", path="vms/img", format="raw", protocol="rbd", auth_username="vmdisk"
    )
    with pytest.raises(InvalidSpec, match="secret UUID"):
        render_disk(location, LibvirtSpec())


def test_paths_are_escaped_not_concatenated() -> None:
    path = "/srv/a dir/it's & <odd>.qcow2"
    xml = render_disk(DiskLocation(type="file", path=path, format="qcow2"), LibvirtSpec())
    source = ET.fromstring(xml).find("source")
    assert source is not None
    assert source.get("file") == path
    validate_disk_xml(xml)


def test_cdrom_is_readonly_without_discard() -> None:
    disk = ET.fromstring(CASES["cdrom.xml"]())
    driver = disk.find("driver")
    assert driver is not None
    assert "discard" not in driver.attrib
    assert disk.find("readonly") is not None


def test_zero_limits_render_no_iotune() -> None:
    assert ET.fromstring(render_disk(QCOW2, LibvirtSpec())).find("iotune") is None


def test_io_follows_cache_when_not_given() -> None:
    driver = ET.fromstring(render_disk(QCOW2, LibvirtSpec(cache="writeback"))).find("driver")
    assert driver is not None
    assert driver.get("io") == "threads"


def test_explicit_fs_driver_wins_over_format_default() -> None:
    location = DiskLocation(type="file", path="/d/disk", format="raw", fs_driver="nbd")
    driver = ET.fromstring(render_filesystem(location, "/")).find("driver")
    assert driver is not None
    assert driver.attrib == {"type": "nbd", "format": "raw"}


def test_network_disk_cannot_be_a_filesystem() -> None:
    with pytest.raises(ValueError, match="network"):
        render_filesystem(RBD, "/")
