"""Host truth beats records: what is on disk decides what is in use and what is orphaned.

Real qemu-img images and the real ``vmdisk`` command on a real state directory.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import sha256_of
from test_cli import vmdisk, vmdisk_doc, write_manifests


def _qcow2_from_image(tmp_path: Path, image_dir: Path, name: str = "root") -> Path:
    image = image_dir / "base.qcow2"
    return write_manifests(
        tmp_path / f"{name}.yaml",
        vmdisk_doc(
            name,
            backend="qcow2",
            size="64Mi",
            source={"image": {"url": f"file://{image}", "checksum": sha256_of(image)}},
        ),
    )


def test_prune_keeps_a_base_whose_overlay_lost_its_record(tmp_path: Path, image_dir: Path):
    state = tmp_path / "state"
    manifest = _qcow2_from_image(tmp_path, image_dir)
    assert vmdisk("apply", "-f", str(manifest), state=state, image_dir=image_dir).returncode == 0
    disk_dir = state / "disks" / "default" / "root"
    (disk_dir / "disk.json").unlink()

    listing = vmdisk("cache", "list", state=state)
    assert listing.stdout.splitlines()[1].split()[4] == "yes", listing.stdout
    pruned = vmdisk("cache", "prune", "--max-age", "0s", state=state)
    assert pruned.returncode == 0 and pruned.stdout == "", pruned.stdout
    # QEMU can still open the whole chain.
    subprocess.run(
        ["qemu-img", "info", "--backing-chain", str(disk_dir / "disk")],
        check=True,
        capture_output=True,
    )


def test_prune_keeps_the_base_of_a_half_made_disk(tmp_path: Path, image_dir: Path):
    state = tmp_path / "state"
    manifest = _qcow2_from_image(tmp_path, image_dir)
    assert vmdisk("apply", "-f", str(manifest), state=state, image_dir=image_dir).returncode == 0
    disk_dir = state / "disks" / "default" / "root"
    base = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk_dir / "disk")],
        check=True,
        capture_output=True,
        text=True,
    )
    backing = json.loads(base.stdout)["backing-filename"]
    # A crash left the overlay in a partial directory, with no record at all.
    partial = disk_dir.with_name(".root.partial")
    disk_dir.rename(partial)
    (partial / "disk.json").unlink()
    pruned = vmdisk("cache", "prune", "--max-age", "0s", state=state)
    assert pruned.stdout == ""
    assert Path(backing).exists()


def test_orphans_lists_data_without_records_in_any_namespace(tmp_path: Path):
    state = tmp_path / "state"
    manifest = write_manifests(
        tmp_path / "m.yaml", vmdisk_doc("owned", backend="raw", size="1Mi", source={"blank": {}})
    )
    assert vmdisk("apply", "-f", str(manifest), state=state).returncode == 0
    disks = state / "disks"
    (disks / "default" / "owned" / "disk.json").unlink()  # owned still: its VMDisk exists
    (disks / "other" / "handmade").mkdir(parents=True)
    (disks / "other" / "handmade" / "disk").write_bytes(b"\0" * 512)
    (disks / "other" / ".halfway.partial").mkdir()
    (disks / "third" / "garbled").mkdir(parents=True)
    (disks / "third" / "garbled" / "disk.json").write_text("{not json")
    (disks / "third" / "stray-file").write_bytes(b"data")

    result = vmdisk("orphans", state=state)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "other/halfway",
        "other/handmade",
        "third/garbled",
        "third/stray-file",
    ]


def test_corrupt_header_fails_that_disk_only(tmp_path: Path):
    state = tmp_path / "state"
    manifest = write_manifests(
        tmp_path / "m.yaml",
        vmdisk_doc("broken", backend="qcow2", size="8Mi", source={"blank": {}}),
        vmdisk_doc("healthy", backend="raw", size="8Mi", source={"blank": {}}),
        vmdisk_doc("later", backend="ploop", size="8Mi", source={"blank": {}}),
    )
    assert vmdisk("apply", "-f", str(manifest), state=state).returncode == 0
    with open(state / "disks" / "default" / "broken" / "disk", "r+b") as handle:
        handle.write(b"\0" * 64)  # the qcow2 header is gone

    result = vmdisk("apply", "-f", str(manifest), "-o", "json", state=state)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    items = {o["metadata"]["name"]: o["status"] for o in json.loads(result.stdout)["items"]}
    assert items["broken"]["phase"] == "Failed"
    ready = next(c for c in items["broken"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "DiskCorrupt" and "qcow2 header" in ready["message"]
    assert items["healthy"]["phase"] == items["later"]["phase"] == "Ready"
