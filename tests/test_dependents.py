"""Deletion and its dependents, on real file disks (qemu-img, the local runner)."""

from __future__ import annotations

from pathlib import Path

from conftest import Manifest
from test_backends import apply, image_source, ready_reason, status_of
from vmdisk.local.runner import LocalRunner


def test_a_failed_clone_does_not_block_deleting_its_source(
    runner: LocalRunner, disk: Manifest, image_dir: Path
):
    (source,) = apply(runner, disk("source", "raw", source=image_source(image_dir)))
    assert status_of(source).phase == "Ready"
    # Smaller than its source: permanently Failed, it will never read the source again.
    (clone,) = apply(runner, disk("clone", "raw", source={"disk": {"name": "source"}}, size="1Mi"))
    assert (status_of(clone).phase, ready_reason(clone)) == ("Failed", "ImageLargerThanDisk")

    assert runner.delete([source]) == []
    assert not Path(status_of(source).path or "").exists()
