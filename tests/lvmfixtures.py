"""LVM test fixtures: a volume group on a loop-device PV made (and removed) by the tests.

LVM is confined to that one loop device by a private ``lvm.conf``
(``LVM_SYSTEM_DIR``), so the host's own volume groups are never touched.
The tests that use it need device-mapper and are marked ``testvm``: on this
machine they run inside the test VM (tests/testvm.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmdisk.host.lvm import Lvm

MiB = 1024 * 1024


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=full_env).stdout


def lvm_conf(pv: Path) -> str:
    """lvm.conf that sees only ``pv`` and, like a pod, has no udev to wait for."""
    return (
        f'devices {{ filter = [ "a|^{pv}$|", "r|.*|" ] obtain_device_list_from_udev = 0\n'
        '  use_devicesfile = 0 external_device_info_source = "none" }\n'
        "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n"
        "backup { backup = 0 archive = 0 }\n"
    )


@dataclass
class VolumeGroup:
    name: str
    pv: Path
    lvm: Lvm
    env: dict[str, str]

    def lvm_cmd(self, *argv: str) -> str:
        return sh(*argv, env=self.env)

    def thin_pool(self, size_mib: int, *, name: str = "vmdisk-thinpool", zero: bool = True) -> str:
        self.lvm_cmd(
            "lvcreate", "-q", "--type", "thin-pool", "-L", f"{size_mib}m",
            "-Z", "y" if zero else "n", "-n", name, self.name,
        )  # fmt: skip
        return name


@contextmanager
def make_volume_group(directory: Path, size: int) -> Iterator[VolumeGroup]:
    """A fresh VG of ``size`` bytes on a loop device under ``directory``, removed afterwards."""
    image = directory / "pv.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
    pv = Path(sh("losetup", "--find", "--show", str(image)).strip())
    etc = directory / "lvm-etc"
    etc.mkdir()
    (etc / "lvm.conf").write_text(lvm_conf(pv))
    env = {"LVM_SYSTEM_DIR": str(etc)}
    name = f"vmdtest{os.getpid()}{directory.name[-6:]}".replace("-", "")
    try:
        sh("pvcreate", "-q", str(pv), env=env)
        sh("vgcreate", "-q", name, str(pv), env=env)
        yield VolumeGroup(name, pv, Lvm(env=env), env)
    finally:
        # Mappings the test left open first (dm-crypt on top of the LVs), then the VG.
        for line in subprocess.run(
            ["dmsetup", "ls"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            mapping = line.split("\t")[0].split(" ")[0]
            if mapping.startswith(f"vmdisk_{name}-"):
                subprocess.run(["dmsetup", "remove", "--force", mapping], check=False)
        for extra in ([], ["--driverloaded=n"]):  # the second where there is no device-mapper
            removed = subprocess.run(
                ["vgremove", "-f", *extra, name],
                env={**os.environ, **env},
                capture_output=True,
                check=False,
            )
            if removed.returncode == 0:
                break
        subprocess.run(["losetup", "-d", str(pv)], capture_output=True, check=False)


@pytest.fixture
def volume_group(tmp_path: Path) -> Iterator[VolumeGroup]:
    """A fresh 128 MiB VG on a loop device, private LVM config, removed afterwards."""
    with make_volume_group(tmp_path, 128 * MiB) as vg:
        yield vg
