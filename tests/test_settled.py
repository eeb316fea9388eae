"""A no-op re-apply skips the engine, and anything a reconcile depended on brings it back.

Real files and real qemu-img throughout.  "The engine ran" is observed as the
runner having built it (it is built on first use): a re-apply that skipped it
built none.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from conftest import Manifest
from test_classes import klass
from vmdisk.api.vmdisk import VMDisk
from vmdisk.config import Settings
from vmdisk.layout import StateLayout
from vmdisk.local.objectfiles import FINGERPRINT
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import LocalStore

MiB = 1024 * 1024


def _runner(settings: Settings) -> LocalRunner:
    """A fresh runner, as a new ``vmdisk apply`` process has: no engine until one is needed."""
    return LocalRunner(settings, None, LocalStore(StateLayout(settings.state_dir)), workers=2)


def _apply(settings: Settings, objects: list[VMDisk]) -> tuple[list[VMDisk], bool]:
    """The results of one apply, and whether it ran the engine."""
    runner = _runner(settings)
    try:
        results = runner.apply(objects)
    finally:
        runner.close()
    disks = [r for r in results if isinstance(r, VMDisk)]
    return disks, runner._engine is not None


def _disks(disk: Manifest) -> list[VMDisk]:
    return [
        disk("q", "qcow2", source={"blank": {}}, size="32Mi"),
        disk("r", "raw", source={"blank": {}}, size="4Mi"),
    ]


def test_an_unchanged_ready_disk_is_not_reconciled_again(settings: Settings, disk: Manifest):
    first, ran = _apply(settings, _disks(disk))
    assert ran and [d.status.phase for d in first if d.status] == ["Ready", "Ready"]
    stored = settings.state_dir / "objects" / "vmdisks" / "vms" / "q.json"
    before = stored.stat().st_mtime_ns
    for _ in range(3):
        again, ran = _apply(settings, _disks(disk))
        assert not ran
        assert again == first
    assert stored.stat().st_mtime_ns == before
    assert FINGERPRINT in stored.read_text()


def test_a_disk_written_since_is_reconciled_and_its_status_refreshed(
    settings: Settings, disk: Manifest
):
    first, _ = _apply(settings, _disks(disk))
    raw = Path(first[1].status.path if first[1].status and first[1].status.path else "")
    with raw.open("r+b") as handle:  # what a guest does: data where there was a hole
        handle.write(os.urandom(MiB))
    again, ran = _apply(settings, _disks(disk))
    assert ran
    assert again[1].status and again[1].status.actual_size == raw.stat().st_blocks * 512
    assert again[1].status.actual_size != (first[1].status.actual_size if first[1].status else 0)
    _, ran = _apply(settings, _disks(disk))
    assert not ran, "the refreshed status did not get a new fingerprint"


def test_a_vanished_disk_is_reported_not_kept_ready(settings: Settings, disk: Manifest):
    first, _ = _apply(settings, _disks(disk))
    assert first[0].status and first[0].status.path
    Path(first[0].status.path).unlink()
    again, ran = _apply(settings, _disks(disk))
    assert ran
    status = again[0].status
    assert status and status.phase == "Failed"
    assert any(c.reason == "DiskMissing" for c in status.conditions)


def test_new_settings_or_a_changed_class_reconcile_again(settings: Settings, disk: Manifest):
    def gold_disk() -> VMDisk:
        obj = disk("g", "raw", source={"blank": {}}, size="1Mi")
        return obj.model_copy(update={"spec": obj.spec.model_copy(update={"class_name": "gold"})})

    gold = klass("gold", "raw")
    _apply(settings, [gold, gold_disk()])  # type: ignore[list-item]
    assert not _apply(settings, [gold_disk()])[1]

    fewer = dataclasses.replace(settings, max_virtual_size=settings.max_virtual_size // 2)
    assert _apply(fewer, [gold_disk()])[1]
    assert not _apply(fewer, [gold_disk()])[1]

    capped = klass("gold", "raw", limits={"maxSize": "2Mi"})
    assert _apply(fewer, [capped, gold_disk()])[1]  # type: ignore[list-item]
    assert not _apply(fewer, [gold_disk()])[1]


def test_a_changed_spec_is_reconciled(settings: Settings, disk: Manifest):
    _apply(settings, _disks(disk))
    grown = [disk("q", "qcow2", source={"blank": {}}, size="64Mi"), _disks(disk)[1]]
    again, ran = _apply(settings, grown)
    assert ran and again[0].status and again[0].status.virtual_size == 64 * MiB
