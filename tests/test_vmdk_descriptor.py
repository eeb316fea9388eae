"""VMDK text descriptors hidden in raw-like images (raw, iso, MBR/gpt) are refused.

Each descriptor names a host file as its extent; where qemu's own probe accepts the
spelling, ``qemu-img info`` without ``-f`` is run to show that it really would open the
host file.  The check covers the first MiB, case-insensitively.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from vmdisk.api.vmdisk import ImageSource
from vmdisk.errors import ImageUnsafe
from vmdisk.images.cache import ImageCache
from vmdisk.images.policy import SourcePolicy

MiB = 1024 * 1024


def descriptor(host: Path, *, spelling: str = "plain") -> bytes:
    lines = {
        "plain": ["# Disk DescriptorFile", "version=1", 'createType="monolithicFlat"'],
        "upper": ["# DISK DESCRIPTORFILE", "version=1", 'CREATETYPE = "monolithicFlat"'],
        "bare": ["version=1"],  # all qemu's probe needs; no createType at all
        "crlf": ["version=1\r", 'createType="monolithicFlat"\r'],
        "spaced": ["   ", "version = 2", "create Type = monolithicFlat"],
    }[spelling]
    return ("\n".join([*lines, f'RW 2048 FLAT "{host}" 0', ""])).encode()


def raw(path: Path, host: Path, spelling: str) -> Path:
    data = descriptor(host, spelling=spelling)
    path.write_bytes(data + bytes(4 * MiB - len(data)))
    return path


def iso_system_area(path: Path, host: Path) -> Path:
    """An ISO 9660 image (volume descriptors at 32 KiB) whose system area holds a descriptor."""
    data = bytearray(4 * MiB)
    pvd = 16 * 2048
    data[pvd : pvd + 7] = b"\x01CD001\x01"
    data[pvd + 80 : pvd + 88] = (2048).to_bytes(4, "little") + (2048).to_bytes(4, "big")
    data[pvd + 128 : pvd + 132] = (2048).to_bytes(2, "little") + (2048).to_bytes(2, "big")
    data[pvd + 2048 : pvd + 2048 + 7] = b"\xffCD001\x01"  # set terminator
    text = descriptor(host, spelling="upper")
    data[20 * 1024 : 20 * 1024 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


def mbr_boot_sector(path: Path, host: Path) -> Path:
    """An MBR disk whose boot code area (bytes 0-445) is a descriptor qemu would probe."""
    data = bytearray(4 * MiB)
    text = descriptor(host, spelling="bare")
    data[: len(text)] = text
    data[446:462] = (
        bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0])
        + (2048).to_bytes(4, "little")
        + (4096).to_bytes(4, "little")
    )
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    return path


def deep_in_first_mib(path: Path, host: Path) -> Path:
    data = bytearray(4 * MiB)
    text = descriptor(host, spelling="spaced")
    data[900 * 1024 : 900 * 1024 + len(text)] = text
    path.write_bytes(bytes(data))
    return path


CASES: dict[str, Callable[[Path, Path], Path]] = {
    "raw-plain": lambda p, h: raw(p, h, "plain"),
    "raw-upper": lambda p, h: raw(p, h, "upper"),
    "raw-bare-version": lambda p, h: raw(p, h, "bare"),
    "raw-crlf": lambda p, h: raw(p, h, "crlf"),
    "raw-spaced": lambda p, h: raw(p, h, "spaced"),
    "iso-system-area": iso_system_area,
    "mbr-boot-sector": mbr_boot_sector,
    "at-900-KiB": deep_in_first_mib,
}
QEMU_PROBES_AS_VMDK = {"raw-plain", "raw-bare-version", "raw-crlf", "mbr-boot-sector"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_descriptor_in_a_raw_like_image_is_refused(case: str, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    host = tmp_path / "host-secret"
    host.write_bytes(b"host secret\n" * 100)
    image = CASES[case](images / "disk.img", host)
    if case in QEMU_PROBES_AS_VMDK:
        # The danger is real: qemu's own probe does not take these bytes for raw.
        probed = subprocess.run(
            ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True
        )
        assert probed.returncode != 0 or json.loads(probed.stdout)["format"] != "raw"
        assert "VMDK" in probed.stderr or probed.returncode != 0
    cache = ImageCache(
        tmp_path / "state" / "cache",
        policy=SourcePolicy(file_dirs=(images,)),
        max_virtual_size=MiB**2,
    )
    with pytest.raises(ImageUnsafe, match="VMDK descriptor"):
        cache.get(ImageSource(url=image.as_uri()), disk_size=8 * MiB)
    assert list(cache.root.glob("sha256-*")) == []
    assert [p for p in (cache.root / "tmp").iterdir()] == []


def test_a_plain_raw_disk_with_text_after_the_first_mib_is_accepted(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    data = bytearray(4 * MiB)
    text = descriptor(tmp_path / "x")
    data[2 * MiB : 2 * MiB + len(text)] = text  # e.g. a file inside the guest's filesystem
    (images / "disk.img").write_bytes(bytes(data))
    cache = ImageCache(
        tmp_path / "state" / "cache",
        policy=SourcePolicy(file_dirs=(images,)),
        max_virtual_size=MiB**2,
    )
    assert (
        cache.get(ImageSource(url=(images / "disk.img").as_uri()), disk_size=8 * MiB).format
        == "raw"
    )
