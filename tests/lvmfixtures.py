"""LVM test fixtures: a volume group on a loop-device PV made (and removed) by the tests.

LVM is confined to that one loop device by a private ``lvm.conf``
(``LVM_SYSTEM_DIR``), so the host's own volume groups are never touched.
Without device-mapper, LVs cannot be activated; ``LoopActivation`` stands in
for activation by exposing a linear LV's extents as a loop device over the
PV (``losetup --offset --sizelimit``), which is exactly what device-mapper's
linear target would map.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmdisk.host.lvm import Lvm

MiB = 1024 * 1024


def device_mapper_available() -> bool:
    try:
        os.close(os.open("/dev/mapper/control", os.O_RDWR))
    except OSError:
        return False
    return True


HAS_DM = device_mapper_available()
NO_DM = "this kernel has no device-mapper (/dev/mapper/control cannot be opened)"
needs_dm = pytest.mark.skipif(not HAS_DM, reason=f"{NO_DM}: LVs cannot be activated here")


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=full_env).stdout


@dataclass
class VolumeGroup:
    name: str
    pv: Path
    lvm: Lvm
    env: dict[str, str]


@pytest.fixture
def volume_group(tmp_path: Path) -> Iterator[VolumeGroup]:
    """A fresh 128 MiB VG on a loop device, private LVM config, removed afterwards."""
    image = tmp_path / "pv.img"
    with open(image, "wb") as handle:
        handle.truncate(128 * MiB)
    pv = Path(sh("losetup", "--find", "--show", str(image)).strip())
    etc = tmp_path / "lvm-etc"
    etc.mkdir()
    (etc / "lvm.conf").write_text(
        f'devices {{ filter = [ "a|^{pv}$|", "r|.*|" ] obtain_device_list_from_udev = 0\n'
        '  use_devicesfile = 0 external_device_info_source = "none" }\n'
        "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n"
        "backup { backup = 0 archive = 0 }\n"
    )
    env = {"LVM_SYSTEM_DIR": str(etc), "LVM_SUPPRESS_FD_WARNINGS": "1"}
    name = f"vmdtest{os.getpid()}{tmp_path.name[-6:]}".replace("-", "")
    try:
        sh("pvcreate", "-q", str(pv), env=env)
        sh("vgcreate", "-q", name, str(pv), env=env)
        yield VolumeGroup(name, pv, Lvm(metadata_only=not HAS_DM, env=env), env)
    finally:
        subprocess.run(
            ["vgremove", "-f", "--driverloaded=n", name],
            env={**os.environ, **env},
            capture_output=True,
            check=False,
        )
        subprocess.run(["losetup", "-d", str(pv)], capture_output=True, check=False)


@dataclass
class LoopActivation:
    """Activation without device-mapper: a loop device over the LV's one linear segment."""

    lvm: Lvm
    loops: dict[tuple[str, str], tuple[Path, int, int]] = field(default_factory=dict)

    def open(self, vg: str, lv: str) -> Path:
        segments = self.lvm.segments(vg, lv)
        offset, size = segments[0].offset, sum(s.size for s in segments)
        for previous, following in itertools.pairwise(segments):
            assert previous.offset + previous.size == following.offset, "LV is not contiguous"
        known = self.loops.get((vg, lv))
        if known is not None and known[1:] == (offset, size):
            return known[0]
        self.close(vg, lv)
        loop = sh(
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(offset),
            "--sizelimit",
            str(size),
            str(segments[0].pv),
        ).strip()
        self.loops[(vg, lv)] = (Path(loop), offset, size)
        return Path(loop)

    def close(self, vg: str, lv: str) -> None:
        known = self.loops.pop((vg, lv), None)
        if known is not None:
            sh("losetup", "-d", str(known[0]))

    def close_all(self) -> None:
        for vg, lv in list(self.loops):
            self.close(vg, lv)


@pytest.fixture
def loop_activation(volume_group: VolumeGroup) -> Iterator[LoopActivation]:
    activation = LoopActivation(volume_group.lvm)
    yield activation
    activation.close_all()
