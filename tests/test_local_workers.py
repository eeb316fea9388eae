"""``vmdisk apply`` with several workers: real qemu-img, a real loopback HTTP server."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from conftest import Manifest
from httpserver import ImageServer, Switches
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.local.runner import LocalRunner, waves
from vmdisk.local.store import LocalStore


def test_many_disks_of_one_image_in_one_apply_download_it_once(
    settings: Settings, engine: Engine, store: LocalStore, disk: Manifest, image_dir: Path
):
    data = (image_dir / "base.qcow2").read_bytes()
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    seen_threads: set[str] = set()
    runner = LocalRunner(settings, engine, store, workers=4)
    reconcile = runner.reconcile

    def noting(obj):  # type: ignore[no-untyped-def]
        seen_threads.add(threading.current_thread().name)
        return reconcile(obj)

    runner.reconcile = noting  # type: ignore[method-assign]
    # A slow body, so the workers ask for the image at the same time.
    with ImageServer(Switches(delay=0.5)) as server:
        url = server.add("/one.qcow2", data)
        source = {"image": {"url": url, "checksum": checksum, "format": "qcow2"}}
        disks = [disk(f"d{i}", "qcow2", source=source, size="32Mi") for i in range(8)]
        results = runner.apply(disks)
        assert len(server.gets("/one.qcow2")) == 1
    assert [r.status.phase if r.status else None for r in results] == ["Ready"] * 8
    assert len(seen_threads) > 1, "the disks were not provisioned concurrently"
    bases = {r.status.base_image for r in results if r.status}
    assert len(bases) == 1


def test_clones_and_snapshots_wait_for_their_sources(
    settings: Settings, engine: Engine, store: LocalStore, disk: Manifest, image_dir: Path
):
    """Listed before what they are made from, they still come out Ready in one apply."""
    from vmdisk.api.snapshot import DiskSnapshot

    snap = DiskSnapshot.model_validate(
        {"metadata": {"name": "s", "namespace": "vms"}, "spec": {"diskName": "base"}}
    )
    batch = [
        disk("from-snap", "qcow2", source={"snapshot": {"name": "s"}}, size="32Mi"),
        disk("clone", "qcow2", source={"disk": {"name": "base"}}, size="32Mi"),
        snap,
        disk("base", "qcow2", source={"blank": {}}, size="32Mi"),
        disk("other", "raw", source={"blank": {}}, size="1Mi"),
    ]
    assert waves(batch) == [[3, 4], [1, 2], [0]]
    runner = LocalRunner(settings, engine, store, workers=2)
    results = runner.apply(batch)
    phases = {r.metadata.name: r.status.phase if r.status else None for r in results}
    assert phases == {
        "from-snap": "Ready",
        "clone": "Ready",
        "s": "Ready",
        "base": "Ready",
        "other": "Ready",
    }


def test_a_cycle_or_a_missing_source_goes_last(disk: Manifest):
    batch = [
        disk("a", "qcow2", source={"disk": {"name": "b"}}, size="1Mi"),
        disk("b", "qcow2", source={"disk": {"name": "a"}}, size="1Mi"),
        disk("c", "qcow2", source={"disk": {"name": "elsewhere"}}, size="1Mi"),
        disk("d", "raw", source={"blank": {}}, size="1Mi"),
    ]
    rounds = waves(batch)
    assert rounds[0] == [2, 3]
    assert sorted(i for r in rounds[1:] for i in r) == [0, 1]
