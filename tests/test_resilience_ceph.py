"""A Ceph outage during RBD provisioning: the OSD is frozen for 30 s.

The engine must answer within its bounds with a temporary condition (not
hang, not fail for good), leave nothing half-made that blocks a retry, and
reach Ready once the OSD is back.  Real Ceph (the suite's single-node
cluster), real engine through local mode.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace
from pathlib import Path

from ceph import CephTestCluster
from conftest import PATTERN, Manifest, MiB, rbd_class, sha256_of
from vmdisk.api.vmdisk import VMDisk
from vmdisk.backends.rbd import RbdBackend
from vmdisk.backends.rbd_config import RbdSettings
from vmdisk.backends.registry import Registry, default_registry
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.layout import StateLayout
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import LocalStore

POOL = "outage"
OUTAGE = 30.0


def test_osd_outage_is_temporary_then_ready(
    ceph_cluster: CephTestCluster, settings: Settings, disk: Manifest, image_dir: Path
) -> None:
    ceph_cluster.create_pool(POOL)
    settings = replace(settings, rbd_pools=(POOL,), ceph_confs=(ceph_cluster.conf,))
    layout = StateLayout(settings.state_dir)
    rbd = replace(RbdSettings.from_settings(settings), op_timeout=3.0)
    files = default_registry(replace(settings, rbd_pools=(), ceph_confs=()), layout)
    engine = Engine.build(
        settings, registry=Registry({**files.backends, "rbd": RbdBackend(rbd, layout)})
    )
    store = LocalStore(layout)
    rbd_class(store, image_dir, POOL)
    runner = LocalRunner(settings, engine, store)
    image = image_dir / "base.qcow2"
    manifest = disk(
        "during-outage",
        "rbd",
        source={"image": {"url": f"file://{image}", "checksum": sha256_of(image)}},
        size="32Mi",
    )
    try:
        ceph_cluster.pause_osd()
        paused = time.monotonic()
        (first,) = runner.apply([manifest])
        assert time.monotonic() - paused < 20  # bounded, no hang
        assert isinstance(first, VMDisk) and first.status is not None
        ready = next(c for c in first.status.conditions if c.type == "Ready")
        assert first.status.phase == "Pending"  # temporary: not Failed
        assert ready.reason in ("CephTimeout", "CephUnavailable"), ready
        assert ready.message.endswith("(will retry)")
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - paused)))
    finally:
        ceph_cluster.resume_osd()

    deadline = time.monotonic() + 90
    while True:  # the retries the operator makes with backoff
        (obj,) = runner.apply([manifest])
        assert obj.status is not None
        if obj.status.phase == "Ready" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert obj.status.phase == "Ready", obj.status.conditions
    engine.close()

    exported = settings.state_dir / "check.raw"
    image_name = (obj.status.path or "").split("/", 1)[1]
    argv = ["rbd", "--conf", str(ceph_cluster.conf), "export", f"{POOL}/{image_name}"]
    subprocess.run([*argv, str(exported)], check=True, capture_output=True, timeout=60)
    with open(exported, "rb") as handle:
        for offset, data in PATTERN.items():
            handle.seek(offset)
            assert handle.read(len(data)) == data
    assert exported.stat().st_size == 32 * MiB
