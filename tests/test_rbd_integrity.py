"""RBD integrity on the suite's real single-node Ceph: metadata of clones, crash windows,
atomic snapshot deletion.

Crash states are built with the real ``rbd``/``rados`` tools into exactly what a
process killed at that point leaves behind (timing a SIGKILL inside a 20 ms
librbd call is not reproducible); the backend then meets them as it would after
the crash.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

import test_rbd
from ceph import CephTestCluster
from conftest import rbd_class
from test_rbd import EXPORTS, POOL, assert_pattern, base_image, read_disk, ref
from vmdisk.api.snapshot import DiskSnapshot
from vmdisk.api.vmdisk import VMDisk
from vmdisk.backends.base import CreateRequest, FromImage, FromStore
from vmdisk.backends.rbd import RbdBackend
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import LocalStore

MiB = 1024 * 1024
pools = test_rbd.pools  # the suite's Ceph with its pools, and a backend on it
backend = test_rbd.backend


def metadata(pools: CephTestCluster, spec: str) -> dict[str, str]:
    return dict(json.loads(pools.rbd("image-meta", "list", "--format", "json", spec)))


def test_clones_start_with_only_their_own_metadata(
    backend: RbdBackend, image_dir: Path, pools: CephTestCluster
) -> None:
    parent = ref("meta-parent")
    backend.create(parent, CreateRequest(16 * MiB, FromImage(base_image(image_dir))))
    backend.create_snapshot(parent, "s1")
    assert backend.rollback(parent, "s1").restored_snapshot == "s1"
    url = backend.direct_snapshot(parent, "meta-export", EXPORTS)
    export = f"{EXPORTS}/vmdisk-snapshot_vms_meta-export"
    assert set(metadata(pools, export)) == {"vmdisk.disk", "vmdisk.complete"}

    child = ref("meta-child")
    state = backend.create(child, CreateRequest(0, FromStore(url)))
    assert (state.restored_snapshot, state.base_image) == (None, None)
    assert metadata(pools, f"{POOL}/{backend.image(child)}") == {
        "vmdisk.disk": str(child),
        "vmdisk.node": "node-a",
        "vmdisk.complete": f"{POOL}/{backend.image(child)}",
    }
    # A restore of the child to a snapshot named like the parent's is not skipped.
    backend.create_snapshot(child, "s1")
    assert backend.rollback(child, "s1").restored_snapshot == "s1"
    backend.delete(child)
    backend.remove_direct_snapshot(parent, "meta-export", EXPORTS)
    backend.delete(parent)


def test_direct_snapshot_killed_during_flatten_is_redone(
    backend: RbdBackend, image_dir: Path, pools: CephTestCluster, tmp_path: Path
) -> None:
    disk = ref("flatten-crash")
    backend.create(disk, CreateRequest(16 * MiB, FromImage(base_image(image_dir))))
    name = f"crash-{uuid.uuid4().hex[:6]}"
    source = f"{POOL}/{backend.image(disk)}"
    target = f"{EXPORTS}/vmdisk-snapshot_vms_{name}"
    # What a kill -9 during flatten leaves: the disk's snapshot and its clone,
    # unflattened, without its @snap (and with whatever librbd copied into it).
    pools.rbd("snap", "create", f"{source}@{name}")
    pools.rbd("snap", "protect", f"{source}@{name}")
    pools.rbd("clone", f"{source}@{name}", target)

    url = backend.direct_snapshot(disk, name, EXPORTS)
    assert url.endswith(f"/{target}/snap")
    info = json.loads(pools.rbd("info", "--format", "json", target))
    assert "parent" not in info  # flattened
    assert [s["name"] for s in json.loads(pools.rbd("snap", "ls", "--format", "json", target))] == [
        "snap"
    ]
    clone = ref("from-redone")
    backend.create(clone, CreateRequest(0, FromStore(url)))
    assert_pattern(read_disk(backend, clone, tmp_path))
    backend.delete(clone)
    backend.remove_direct_snapshot(disk, name, EXPORTS)
    backend.delete(disk)


def _break_header(pools: CephTestCluster, pool: str, image: str) -> None:
    """Leave ``pool/image`` listed but unopenable, as a clone killed midway does."""
    image_id = pools.rbd("info", "--format", "json", f"{pool}/{image}")
    header = f"rbd_header.{json.loads(image_id)['id']}"
    subprocess.run(
        ["rados", "--conf", str(pools.conf), "-p", pool, "rm", header], check=True, timeout=60
    )
    assert image in pools.rbd("ls", pool).split()
    with pytest.raises(RuntimeError):
        pools.rbd("info", f"{pool}/{image}")


def test_a_half_made_image_is_removed_by_the_next_create(
    backend: RbdBackend, image_dir: Path, pools: CephTestCluster, tmp_path: Path
) -> None:
    disk = ref("half-made")
    image = backend.image(disk)
    pools.rbd("create", "--size", "16M", f"{POOL}/{image}")
    _break_header(pools, POOL, image)
    assert backend.state(disk) is None
    state = backend.create(disk, CreateRequest(16 * MiB, FromImage(base_image(image_dir))))
    assert state.virtual_size == 16 * MiB
    assert_pattern(read_disk(backend, disk, tmp_path))
    backend.delete(disk)
    assert image not in pools.rbd("ls", POOL).split()


@pytest.fixture
def rbd_runner(state_dir: Path, image_dir: Path, pools: CephTestCluster) -> LocalRunner:
    settings = Settings(
        state_dir=state_dir,
        node_name="node-a",
        image_dirs=(image_dir,),
        rbd_pools=(POOL, EXPORTS),
        ceph_confs=(pools.conf,),
    )
    engine = Engine.build(settings)
    store = LocalStore(engine.layout)
    rbd_class(store, image_dir, POOL)
    return LocalRunner(settings, engine, store)


def test_refused_snapshot_deletion_removes_nothing(
    rbd_runner: LocalRunner, image_dir: Path, pools: CephTestCluster
) -> None:
    name = f"atomic-{uuid.uuid4().hex[:6]}"
    raw = image_dir / "base.raw"
    disk = VMDisk.model_validate(
        {
            "metadata": {"name": name, "namespace": "vms"},
            "spec": {"backend": "rbd", "size": "16Mi", "source": {"image": {"url": raw.as_uri()}}},
        }
    )
    published = DiskSnapshot.model_validate(
        {
            "metadata": {"name": f"{name}-p", "namespace": "vms"},
            "spec": {"diskName": name, "export": {"pool": EXPORTS}},
        }
    )
    exported = DiskSnapshot.model_validate(
        {
            "metadata": {"name": f"{name}-f", "namespace": "vms"},
            "spec": {"diskName": name, "export": {"format": "raw"}},
        }
    )
    made = rbd_runner.apply([disk, published, exported])
    assert all(o.status is not None and o.status.phase == "Ready" for o in made), made
    assert isinstance(made[2], DiskSnapshot) and made[2].status is not None
    export_path = Path(made[2].status.export_path or "")
    # Clones of the disk's own snapshots hold them (Glance-style rbd:// URLs).
    children = []
    for snap in (published, exported):
        child = VMDisk.model_validate(
            {
                "metadata": {"name": f"{snap.metadata.name}-c", "namespace": "vms"},
                "spec": {
                    "backend": "rbd",
                    "source": {
                        "image": {
                            "url": f"rbd://{pools.fsid}/{POOL}/vmdisk_vms_{name}/{snap.metadata.name}"
                        }
                    },
                },
            }
        )
        (cloned,) = rbd_runner.apply([child])
        assert cloned.status is not None and cloned.status.phase == "Ready", cloned.status
        children.append(cloned)

    problems = rbd_runner.delete([published, exported])
    assert len(problems) == 2 and all("HasDependents" in p for p in problems), problems
    assert f"vmdisk-snapshot_vms_{name}-p" in pools.rbd("ls", EXPORTS).split()
    assert export_path.exists()
    snaps = pools.rbd("snap", "ls", f"{POOL}/vmdisk_vms_{name}")
    assert f"{name}-p" in snaps and f"{name}-f" in snaps

    assert rbd_runner.delete(children) == []
    assert rbd_runner.delete([published, exported, disk]) == []
    assert f"vmdisk-snapshot_vms_{name}-p" not in pools.rbd("ls", EXPORTS).split()
    assert not export_path.exists()


def test_rbd_capacity_is_the_pools_and_reaches_the_metrics(
    rbd_runner: LocalRunner, pools: CephTestCluster
) -> None:
    """The figures are the manager's (``ceph df``): the suite's cluster gets a ceph-mgr here."""
    from prometheus_client import generate_latest

    from test_metrics import samples, value
    from vmdisk.backends.base import SupportsCapacity
    from vmdisk.operator.metrics import Metrics

    pools.start_mgr()
    rbd = rbd_runner.engine.registry.get("rbd")
    assert isinstance(rbd, SupportsCapacity)
    capacity = rbd.capacity()
    df = json.loads(pools.ceph("df", "--format", "json"))
    (stats,) = [p["stats"] for p in df["pools"] if p["name"] == POOL]
    assert capacity.placement == POOL
    assert 0 < capacity.free <= df["stats"]["total_avail_bytes"]
    assert abs(capacity.free - stats["max_avail"]) <= stats["max_avail"] // 10
    assert capacity.size >= capacity.free + stats["stored"] - stats["stored"] // 10

    metrics = Metrics("node-a")
    metrics.watch_engine(rbd_runner.engine)
    found = samples(generate_latest(metrics.registry).decode())
    free = value(found, "vmdisk_backend_free_bytes", backend="rbd", placement=POOL)
    assert free is not None and free > 0
    size = value(found, "vmdisk_backend_size_bytes", backend="rbd", placement=POOL)
    assert size is not None and size >= free
