"""Pure parts of the rbd backend: image names, mon_host parsing, rbd:// URLs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmdisk.backends.base import NetworkHost
from vmdisk.backends.rbd_config import parse_mon_host
from vmdisk.backends.rbd_names import disk_image, escape, export_image, parse_disk_image

names = st.text(min_size=1, max_size=40)


def test_plain_kubernetes_names_stay_readable() -> None:
    assert disk_image("vms", "web-root.v2") == "vmdisk_vms_web-root.v2"
    assert export_image("vms", "nightly") == "vmdisk-snapshot_vms_nightly"


@given(names, names, names, names)
def test_names_never_collide(ns1: str, n1: str, ns2: str, n2: str) -> None:
    if (ns1, n1) != (ns2, n2):
        assert disk_image(ns1, n1) != disk_image(ns2, n2)


@given(names, names)
def test_names_round_trip_and_are_safe(ns: str, name: str) -> None:
    image = disk_image(ns, name)
    assert parse_disk_image(image) == (ns, name)
    assert not set("/@:") & set(image) and image.count("_") == 2
    assert "_" not in escape(ns)


@pytest.mark.parametrize(
    "image", ["other", "uuid_disk", "vmdisk_a", "vmdisk_a_b_c", "vmdisk_A_b", "vmdisk-snapshot_a_b"]
)
def test_foreign_images_are_not_ours(image: str) -> None:
    assert parse_disk_image(image) is None


@pytest.mark.parametrize(
    ("mon_host", "hosts"),
    [
        ("10.0.0.1", [NetworkHost("10.0.0.1")]),
        ("10.0.0.1:6789,10.0.0.2", [NetworkHost("10.0.0.1", 6789), NetworkHost("10.0.0.2")]),
        ("mon-a.example mon-b", [NetworkHost("mon-a.example"), NetworkHost("mon-b")]),
        ("v2:10.0.0.1:3300/0", [NetworkHost("10.0.0.1", 3300)]),
        (
            "[v2:10.0.0.1:3300,v1:10.0.0.1:6789] [v2:10.0.0.2:3300,v1:10.0.0.2:6789]",
            [NetworkHost("10.0.0.1", 6789), NetworkHost("10.0.0.2", 6789)],
        ),
        ("[v2:[fd00::1]:3300,v1:[fd00::1]:6789]", [NetworkHost("fd00::1", 6789)]),
        ("[fd00::1]:6789, [fd00::2]", [NetworkHost("fd00::1", 6789), NetworkHost("fd00::2")]),
    ],
)
def test_mon_host_parsing(mon_host: str, hosts: list[NetworkHost]) -> None:
    assert list(parse_mon_host(mon_host)) == hosts
