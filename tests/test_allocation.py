"""What a disk allocates on the host: sparse stays sparse, ``full`` means written zeroes.

Real qemu-img, real files on the test machine's filesystem; ``filefrag``
(e2fsprogs) reads the extents back from the kernel (FIEMAP).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import PATTERN, Manifest, MiB, qemu_read
from test_backends import apply, image_source, status_of
from vmdisk.api.snapshot import DiskSnapshot
from vmdisk.local.runner import LocalRunner


def _extent_flags(path: Path) -> list[str]:
    """The flags column of every extent of ``path``."""
    out = subprocess.run(
        ["filefrag", "-v", str(path)], check=True, capture_output=True, text=True
    ).stdout
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and ":" in line]
    return [row.split(":")[-1] for row in rows]


def snapshot(disk_name: str) -> DiskSnapshot:
    """DiskSnapshot ``s`` of ``disk_name``."""
    return DiskSnapshot.model_validate(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "s", "namespace": "vms"},
            "spec": {"diskName": disk_name},
        }
    )


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_ploop_from_an_image_and_its_grow_stay_sparse(
    runner: LocalRunner, disk: Manifest, image_dir: Path
):
    manifest = disk("sparse", "ploop", source=image_source(image_dir), size="64Mi")
    (obj,) = apply(runner, manifest)
    st = status_of(obj)
    assert st.phase == "Ready"
    data = Path(st.path or "")
    # The 16 MiB image holds a few bytes of data: a few 1 MiB ploop blocks.
    assert _allocated(data) < 8 * MiB, _allocated(data)
    for offset, expected in PATTERN.items():
        assert qemu_read(data, "parallels", offset, len(expected)) == expected

    (grown,) = apply(runner, disk("sparse", "ploop", source=image_source(image_dir), size="1Gi"))
    assert status_of(grown).virtual_size == 1024 * MiB
    assert _allocated(data) < 8 * MiB, _allocated(data)
    for offset, expected in PATTERN.items():
        assert qemu_read(data, "parallels", offset, len(expected)) == expected


@pytest.mark.parametrize("content", ["image", "clone", "snapshot", "filesystem"])
def test_raw_full_preallocation_writes_zeroes_and_keeps_data(
    runner: LocalRunner, disk: Manifest, image_dir: Path, content: str
):
    size = 24 * MiB
    if content == "image":
        source: dict[str, object] = image_source(image_dir)
    elif content == "filesystem":
        source = {"blank": {"filesystem": "ext4"}}
    else:
        (origin,) = apply(runner, disk("origin", "raw", source=image_source(image_dir)))
        assert status_of(origin).phase == "Ready"
        if content == "clone":
            source = {"disk": {"name": "origin"}}
        else:
            snap = snapshot("origin")
            (done,) = apply(runner, snap)
            assert done.status is not None and done.status.phase == "Ready"
            source = {"snapshot": {"name": "s"}}
    (obj,) = apply(runner, disk("full", "raw", source=source, size="24Mi", preallocation="full"))
    st = status_of(obj)
    assert st.phase == "Ready", st.conditions
    data = Path(st.path or "")
    assert _allocated(data) >= size
    flags = _extent_flags(data)
    assert flags and not [f for f in flags if "unwritten" in f], flags  # zeroes, not fallocate
    if content != "filesystem":
        for offset, expected in PATTERN.items():
            assert qemu_read(data, "raw", offset, len(expected)) == expected
    else:
        subprocess.run(["e2fsck", "-fn", str(data)], check=True, capture_output=True)


@pytest.mark.parametrize("preallocation", ["falloc", "full"])
def test_raw_grow_and_restore_allocate_as_the_disk_was_made(
    runner: LocalRunner, disk: Manifest, preallocation: str
):
    def made(size: str, **spec: object) -> Path:
        manifest = disk("pre", "raw", source={"blank": {}}, size=size,
                        preallocation=preallocation, **spec)  # fmt: skip
        (obj,) = apply(runner, manifest)
        assert status_of(obj).phase == "Ready", status_of(obj).conditions
        return Path(status_of(obj).path or "")

    data = made("8Mi")
    snap = snapshot("pre")
    (done,) = apply(runner, snap)
    assert done.status is not None and done.status.phase == "Ready"
    assert _allocated(data) >= 8 * MiB
    made("16Mi")
    assert _allocated(data) >= 16 * MiB  # the new half too, not a hole
    # Rolled back to the 8 MiB snapshot of a 16 MiB disk: all of it allocated again.
    data = made("16Mi", restore={"snapshot": "s"})
    assert _allocated(data) >= 16 * MiB
    if preallocation == "full":
        assert not [f for f in _extent_flags(data) if "unwritten" in f]


def test_qcow2_grow_preallocates_as_the_disk_was_made(runner: LocalRunner, disk: Manifest):
    def made(size: str) -> Path:
        manifest = disk("preq", "qcow2", source={"blank": {}}, size=size, preallocation="falloc")
        (obj,) = apply(runner, manifest)
        assert status_of(obj).phase == "Ready", status_of(obj).conditions
        return Path(status_of(obj).path or "")

    assert _allocated(made("8Mi")) >= 8 * MiB
    assert _allocated(made("32Mi")) >= 32 * MiB
