"""Deletion and its dependents, on real file disks (qemu-img, the local runner)."""

from __future__ import annotations

from pathlib import Path

from conftest import Manifest
from test_backends import apply, image_source, ready_reason, status_of
from vmdisk.api.vmdisk import VMDisk
from vmdisk.engine.reconcile import Engine
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import LocalStore


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


def test_deletion_says_what_happened_to_the_data(
    engine: Engine, store: LocalStore, runner: LocalRunner, disk: Manifest
):
    """The text of the operator's ``Deleted`` event comes from the engine."""
    (kept,) = apply(
        runner, disk("kept", "raw", source={"blank": {}}, size="1Mi", deletionPolicy="Retain")
    )
    (gone,) = apply(runner, disk("gone", "raw", source={"blank": {}}, size="1Mi"))
    assert isinstance(kept, VMDisk) and isinstance(gone, VMDisk)
    path = status_of(kept).path or ""
    assert engine.delete_disk(kept, store) == f"disk data kept at {path} (deletionPolicy: Retain)"
    assert Path(path).exists()
    removed = engine.delete_disk(gone, store)
    assert removed == f"disk data removed from {status_of(gone).path} (deletionPolicy: Delete)"
    assert not Path(status_of(gone).path or "").exists()


def test_both_lookups_answer_the_dependents_queries_alike(store: LocalStore, disk: Manifest):
    """The file store (local mode) and the agent's index lookup, over the same objects."""
    from vmdisk.api.common import dump
    from vmdisk.api.snapshot import DiskSnapshot
    from vmdisk.operator.lookup import Indexed, IndexLookup

    snap = DiskSnapshot.model_validate(
        {"metadata": {"name": "s1", "namespace": "vms"}, "spec": {"diskName": "base"}}
    )
    objects = [
        disk("base", "qcow2", source={"blank": {}}, size="1Mi"),
        disk("clone", "qcow2", source={"disk": {"name": "base"}}, size="1Mi"),
        disk("from-s1", "qcow2", source={"snapshot": {"name": "s1"}}, size="1Mi"),
        disk("unrelated", "qcow2", source={"disk": {"name": "other"}}, size="1Mi"),
        snap,
    ]
    stored = [store.apply(o) for o in objects]
    disks = {("vms", o.metadata.name): [Indexed(dump(o))] for o in stored if o.kind == "VMDisk"}
    snaps = {("vms", o.metadata.name): [dump(o)] for o in stored if o.kind == "DiskSnapshot"}
    index = IndexLookup(disks, snaps)
    for lookup in (store, index):
        assert [s.metadata.name for s in lookup.snapshots_of("vms", "base")] == ["s1"]
        assert [d.metadata.name for d in lookup.disks_from("vms", "disk", "base")] == ["clone"]
        assert [d.metadata.name for d in lookup.disks_from("vms", "snapshot", "s1")] == ["from-s1"]
        assert lookup.disks_from("vms", "disk", "clone") == []
        assert lookup.snapshots_of("elsewhere", "base") == []

    # The store's index follows its own writes and removals...
    store.remove(stored[1])
    assert store.disks_from("vms", "disk", "base") == []
    # ...and another writer's (a second store is another process's view).
    LocalStore(store.layout).apply(disk("late", "qcow2", source={"disk": {"name": "base"}}))
    assert [d.metadata.name for d in store.disks_from("vms", "disk", "base")] == ["late"]
