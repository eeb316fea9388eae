"""One behaviour suite, run for real (qemu-img, real files) against every file backend."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PATTERN, Manifest, MiB, qemu_read, sha256_of
from vmdisk.api.vmdisk import VMDisk, VMDiskStatus
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import Resource

BACKENDS = ["raw", "qcow2", "ploop"]
FORMATS = {"raw": "raw", "qcow2": "qcow2", "ploop": "parallels"}


def apply(runner: LocalRunner, *objects: Resource) -> list[Resource]:
    return runner.apply(list(objects))


def status_of(obj: Resource) -> VMDiskStatus:
    assert isinstance(obj, VMDisk) and obj.status is not None
    return obj.status


def ready_reason(obj: Resource) -> str:
    assert obj.status is not None
    return next(c.reason for c in obj.status.conditions if c.type == "Ready")


def guest_write(path: Path, fmt: str, offset: int, data: bytes) -> None:
    """Write as a guest would, through QEMU's block layer."""
    pattern = data.hex()
    assert len(data) == 1
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P 0x{pattern} {offset} 4k", str(path)],
        check=True,
        capture_output=True,
    )


def image_source(image_dir: Path, name: str = "base.qcow2") -> dict[str, object]:
    path = image_dir / name
    return {"image": {"url": f"file://{path}", "checksum": sha256_of(path)}}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_blank_disk_has_pinned_format_and_size(runner: LocalRunner, disk: Manifest, backend: str):
    (obj,) = apply(runner, disk("blank", backend, source={"blank": {}}, size="32Mi"))
    st = status_of(obj)
    assert (st.phase, st.format, st.virtual_size) == ("Ready", FORMATS[backend], 32 * MiB)
    assert st.path and Path(st.path).exists()
    record = json.loads((Path(st.path).parent / "disk.json").read_text())
    assert record["format"] == FORMATS[backend]
    # libvirt calls the parallels format "ploop" (its QEMU driver maps it back).
    assert st.libvirt_xml and f'type="{backend}"' in st.libvirt_xml


def test_second_apply_changes_nothing(runner: LocalRunner, disk: Manifest, backend: str):
    manifest = disk("idem", backend, source={"blank": {}}, size="8Mi")
    (first,) = apply(runner, manifest)
    path = Path(status_of(first).path or "")
    before = path.stat()
    (second,) = apply(runner, manifest)
    after = path.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert second.metadata.generation == first.metadata.generation == 1
    assert status_of(second).phase == "Ready"


def test_from_image_keeps_guest_data(
    runner: LocalRunner, disk: Manifest, backend: str, image_dir: Path
):
    (obj,) = apply(runner, disk("img", backend, source=image_source(image_dir), size="64Mi"))
    st = status_of(obj)
    assert st.phase == "Ready", st.conditions
    assert st.virtual_size == 64 * MiB
    assert st.base_image and st.base_image.startswith("sha256-")
    for offset, data in PATTERN.items():
        assert qemu_read(Path(st.path or ""), FORMATS[backend], offset, len(data)) == data


def test_size_defaults_to_the_image_size(
    runner: LocalRunner, disk: Manifest, backend: str, image_dir: Path
):
    (obj,) = apply(runner, disk("nosize", backend, source=image_source(image_dir, "base.raw")))
    assert status_of(obj).virtual_size == 16 * MiB


def test_image_larger_than_disk_is_refused_and_leaves_nothing(
    runner: LocalRunner, disk: Manifest, backend: str, image_dir: Path, state_dir: Path
):
    (obj,) = apply(runner, disk("small", backend, source=image_source(image_dir), size="8Mi"))
    assert status_of(obj).phase == "Failed"
    assert ready_reason(obj) == "ImageLargerThanDisk"
    assert not (state_dir / "disks" / "vms" / "small").exists()
    assert not list((state_dir / "disks").glob("*/.small.partial"))


def test_grow_keeps_data_and_shrink_is_refused(
    runner: LocalRunner, disk: Manifest, backend: str, image_dir: Path
):
    source = image_source(image_dir)
    apply(runner, disk("grow", backend, source=source, size="32Mi"))
    (grown,) = apply(runner, disk("grow", backend, source=source, size="48Mi"))
    st = status_of(grown)
    assert (st.phase, st.virtual_size, grown.metadata.generation) == ("Ready", 48 * MiB, 2)
    path = Path(st.path or "")
    assert qemu_read(path, FORMATS[backend], 5 * MiB, 19) == PATTERN[5 * MiB]

    (shrunk,) = apply(runner, disk("grow", backend, source=source, size="16Mi"))
    # Refused, and the disk stays Ready: a VM controller waiting for Ready still boots it.
    assert (status_of(shrunk).phase, ready_reason(shrunk)) == ("Ready", "Provisioned")
    refused = [c for c in status_of(shrunk).conditions if c.type == "ChangeRefused"]
    assert [c.reason for c in refused] == ["ShrinkNotSupported"]
    out = subprocess.run(
        ["qemu-img", "info", "-f", FORMATS[backend], "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.stdout)["virtual-size"] == 48 * MiB


def test_blank_with_filesystem(runner: LocalRunner, disk: Manifest, backend: str):
    (obj,) = apply(
        runner, disk("fs", backend, source={"blank": {"filesystem": "ext4"}}, size="32Mi")
    )
    st = status_of(obj)
    # ext2/3/4 superblock magic 0xEF53 at byte 1080.
    assert qemu_read(Path(st.path or ""), FORMATS[backend], 1080, 2) == b"\x53\xef"


def test_snapshot_restore_export_and_clone(
    runner: LocalRunner, disk: Manifest, backend: str, image_dir: Path, state_dir: Path
):
    source = image_source(image_dir)
    (src,) = apply(runner, disk("src", backend, source=source, size="32Mi"))
    path, fmt = Path(status_of(src).path or ""), FORMATS[backend]
    snap = {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "DiskSnapshot",
        "metadata": {"name": "before", "namespace": "vms"},
        "spec": {"diskName": "src", "export": {"format": "raw"}},
    }
    from vmdisk.api.snapshot import DiskSnapshot

    (taken,) = apply(runner, DiskSnapshot.model_validate(snap))
    assert taken.status is not None and taken.status.ready_to_use
    export = Path(taken.status.export_path or "")
    assert export.is_relative_to(state_dir)
    assert qemu_read(export, "raw", 0, 18) == PATTERN[0]

    guest_write(path, fmt, 0, b"\x77")
    assert qemu_read(path, fmt, 0, 4) == b"\x77" * 4

    # A clone of the snapshot sees the old data, a clone of the disk the new.
    (from_snap,) = apply(runner, disk("fromsnap", backend, source={"snapshot": {"name": "before"}}))
    (clone,) = apply(runner, disk("clone", backend, source={"disk": {"name": "src"}}))
    assert qemu_read(Path(status_of(from_snap).path or ""), fmt, 0, 18) == PATTERN[0]
    assert qemu_read(Path(status_of(clone).path or ""), fmt, 0, 4) == b"\x77" * 4

    restore = disk("src", backend, source=source, size="32Mi", restore={"snapshot": "before"})
    (restored,) = apply(runner, restore)
    assert status_of(restored).restored_snapshot == "before"
    assert qemu_read(path, fmt, 0, 18) == PATTERN[0]

    # Applied once per value: later writes survive further reconciles.
    guest_write(path, fmt, 0, b"\x66")
    apply(runner, restore)
    assert qemu_read(path, fmt, 0, 4) == b"\x66" * 4


def test_qcow2_clone_keeps_sharing_the_cached_base(
    runner: LocalRunner, disk: Manifest, image_dir: Path
):
    (src,) = apply(runner, disk("src", "qcow2", source=image_source(image_dir), size="32Mi"))
    (clone,) = apply(runner, disk("clone", "qcow2", source={"disk": {"name": "src"}}))
    st = status_of(clone)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", "--output=json", st.path or ""],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["backing-filename"].endswith(status_of(src).base_image or "?")
    assert (st.actual_size or 0) < MiB


def test_guest_written_header_does_not_change_the_pinned_format(
    runner: LocalRunner, disk: Manifest
):
    """Nova bug 1221190: a guest writing a qcow2 header must not change the format."""
    manifest = disk("pinned", "raw", source={"blank": {}}, size="8Mi")
    (obj,) = apply(runner, manifest)
    path = Path(status_of(obj).path or "")
    with open(path, "r+b") as handle:
        handle.write(b"QFI\xfb\x00\x00\x00\x03")
    (again,) = apply(runner, manifest)
    assert status_of(again).format == "raw"
    assert 'type="raw"' in (status_of(again).libvirt_xml or "")


def test_vanished_data_is_reported_not_recreated(runner: LocalRunner, disk: Manifest, backend: str):
    manifest = disk("gone", backend, source={"blank": {}}, size="8Mi")
    (obj,) = apply(runner, manifest)
    path = Path(status_of(obj).path or "")
    for child in sorted(path.parent.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    (again,) = apply(runner, manifest)
    assert status_of(again).phase == "Failed"
    assert ready_reason(again) == "DiskMissing"
    assert not path.exists()


def test_preallocation(runner: LocalRunner, disk: Manifest, backend: str):
    (obj,) = apply(
        runner, disk("pre", backend, source={"blank": {}}, size="16Mi", preallocation="falloc")
    )
    st = status_of(obj)
    if backend == "ploop":
        assert (st.phase, ready_reason(obj)) == ("Failed", "InvalidSpec")
        return
    assert st.phase == "Ready"
    assert (st.actual_size or 0) >= 16 * MiB


def test_crash_leftovers_are_cleaned_and_failures_leave_nothing(
    runner: LocalRunner, disk: Manifest, backend: str, state_dir: Path
):
    partial = state_dir / "disks" / "vms" / ".late.partial"
    partial.mkdir(parents=True)
    (partial / "junk").write_bytes(b"half a disk")
    (obj,) = apply(runner, disk("late", backend, source={"blank": {}}, size="8Mi"))
    assert status_of(obj).phase == "Ready"
    assert not partial.exists()

    # A clone whose source cannot be read fails half-way: nothing of it remains.
    src_path = Path(status_of(obj).path or "")
    src_path.unlink()
    src_path.mkdir()
    (clone,) = apply(runner, disk("broken", backend, source={"disk": {"name": "late"}}))
    assert status_of(clone).phase in ("Failed", "Pending")
    assert ready_reason(clone) in ("CommandFailed", "HostIOError")
    assert not (state_dir / "disks" / "vms" / "broken").exists()
    assert not (state_dir / "disks" / "vms" / ".broken.partial").exists()
