"""Benign and hostile disk images, built with the real qemu-img."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
from pathlib import Path

from vmdisk.host import qemu_img
from vmdisk.host.run import run

MiB = 1024 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksum(path: Path) -> str:
    return "sha256:" + sha256(path)


def raw(path: Path, size: int = 4 * MiB, seed: int = 1) -> Path:
    """A raw image with pseudo-random data in its first half and a hole after."""
    rng = random.Random(seed)
    with open(path, "wb") as out:
        out.write(rng.randbytes(size // 2))
        out.truncate(size)
    return path


def qcow2(path: Path, size: int = 4 * MiB, seed: int = 1) -> Path:
    """A qcow2 image holding the data of ``raw(size, seed)``."""
    source = raw(path.with_suffix(".src.raw"), size, seed)
    qemu_img.convert(source, "raw", path, "qcow2")
    source.unlink()
    return path


def qcow2_with_backing(path: Path, host_file: Path) -> Path:
    """A qcow2 whose backing file is a host file (would leak it to the guest)."""
    shutil.copyfile("/etc/hostname", host_file)
    qemu_img.create(path, "qcow2", MiB, backing=host_file, backing_format="raw")
    return path


def qcow2_with_data_file(path: Path, data_file: Path) -> Path:
    """A qcow2 whose guest data lives in another (host) file."""
    qemu_img.create(path, "qcow2", MiB, options={"data_file": str(data_file)})
    return path


def vmdk_descriptor(path: Path, host_file: Path, *, evade_inspector: bool = False) -> Path:
    """A monolithicFlat VMDK descriptor whose extent is a host file.

    With ``evade_inspector`` a control byte in the comment line makes oslo's
    inspector see raw bytes, while qemu's probe still reads it as VMDK.
    """
    shutil.copyfile("/etc/hostname", host_file)
    first = "# Disk DescriptorFile \x01\n" if evade_inspector else "# Disk DescriptorFile\n"
    path.write_text(
        first + "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n'
        f'RW 2048 FLAT "{host_file}" 0\n\n'
        'ddb.adapterType = "ide"\n'
    )
    return path


def vmdk(path: Path) -> Path:
    """A plain, safe monolithicSparse VMDK: a format we do not use as a base."""
    qemu_img.create(path, "vmdk", MiB)
    return path


def huge_qcow2(path: Path, size: int = 1024**5) -> Path:
    """A tiny file claiming a petabyte; 2 MiB clusters keep the L1 table small."""
    qemu_img.create(path, "qcow2", size, options={"cluster_size": str(2 * MiB)})
    return path


def corrupt_qcow2(path: Path) -> Path:
    """A qcow2 whose first refcount block is zeroed: ``qemu-img check`` fails."""
    qcow2(path)
    with open(path, "r+b") as handle:
        header = handle.read(104)
        cluster_bits = struct.unpack(">I", header[20:24])[0]
        refcount_table = struct.unpack(">Q", header[48:56])[0]
        handle.seek(refcount_table)
        block = struct.unpack(">Q", handle.read(8))[0]
        handle.seek(block)
        handle.write(b"\0" * (1 << cluster_bits))
    return path


def qemu_img_check_fails(path: Path) -> bool:
    """True when qemu-img check reports corruption (not just leaks)."""
    try:
        run(["qemu-img", "check", "-f", "qcow2", str(path)])
    except Exception as exc:
        return getattr(exc, "returncode", None) == 2
    return False
