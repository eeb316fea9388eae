"""The rbd backend against a real single-node Ceph (tests/ceph.py), no mocks of librbd."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ceph import CephTestCluster
from conftest import PATTERN, MiB, read_at, sha256_of
from vmdisk.api.snapshot import DiskSnapshot
from vmdisk.api.vmdisk import LibvirtSpec, VMDisk
from vmdisk.api.vmdiskclass import VMDiskClass
from vmdisk.backends.base import BaseImage, Blank, CreateRequest, DiskRef, FromImage, FromStore
from vmdisk.backends.rbd import RbdBackend, SourceNotInCluster
from vmdisk.backends.rbd_config import RbdSettings
from vmdisk.config import Settings
from vmdisk.errors import HasDependents, ImageLargerThanDisk, PermanentError, TemporaryError
from vmdisk.layout import StateLayout
from vmdisk.libvirt import render_disk
from vmdisk.local.runner import LocalRunner

POOL, EXPORTS, IMAGES = "vms", "exports", "images"


@pytest.fixture(scope="session")
def pools(ceph_cluster: CephTestCluster) -> CephTestCluster:
    for pool in (POOL, EXPORTS, IMAGES):
        ceph_cluster.create_pool(pool)
    return ceph_cluster


@pytest.fixture
def backend(pools: CephTestCluster, tmp_path: Path) -> Iterator[RbdBackend]:
    settings = RbdSettings(
        pools=(POOL, EXPORTS), ceph_confs=(pools.conf,), node_name="node-a", op_timeout=3.0
    )
    backend = RbdBackend(settings, StateLayout(tmp_path / "state"))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def glance_image(pools: CephTestCluster, image_dir: Path) -> str:
    """A Glance-style image: base.raw imported, snapshot ``snap`` protected; its URL."""
    pools.rbd("import", str(image_dir / "base.raw"), f"{IMAGES}/glance-base")
    pools.rbd("snap", "create", f"{IMAGES}/glance-base@snap")
    pools.rbd("snap", "protect", f"{IMAGES}/glance-base@snap")
    return f"rbd://{pools.fsid}/{IMAGES}/glance-base/snap"


def ref(prefix: str) -> DiskRef:
    return DiskRef("vms", f"{prefix}-{uuid.uuid4().hex[:8]}", POOL)


def base_image(image_dir: Path) -> BaseImage:
    return BaseImage("sha256-test", image_dir / "base.qcow2", "qcow2", 16 * MiB)


def read_disk(backend: RbdBackend, disk: DiskRef, tmp: Path, snapshot: str | None = None) -> Path:
    """The disk's guest-visible bytes exported through qemu-img (block-rbd)."""
    readable = backend.readable(disk, snapshot)
    out = tmp / f"{disk.name}-{snapshot}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(readable.path), str(out)], check=True
    )
    return out


def assert_pattern(path: Path) -> None:
    for offset, data in PATTERN.items():
        assert read_at(path, offset, len(data)) == data


# -- provisioning -------------------------------------------------------------------
def test_import_from_cached_image(backend: RbdBackend, image_dir: Path, tmp_path: Path) -> None:
    disk = ref("import")
    state = backend.create(disk, CreateRequest(32 * MiB, FromImage(base_image(image_dir))))
    assert (state.format, state.virtual_size, state.base_image) == ("raw", 32 * MiB, "sha256-test")
    assert state.parent is None
    assert state.actual_size < 16 * MiB  # zero blocks were never written
    assert_pattern(read_disk(backend, disk, tmp_path))
    assert backend.create(disk, CreateRequest(32 * MiB, Blank())) == state  # idempotent
    assert disk in backend.inventory()
    backend.delete(disk)
    assert backend.state(disk) is None
    backend.delete(disk)  # missing is fine


def test_clone_shares_the_parents_data(
    backend: RbdBackend, glance_image: str, tmp_path: Path, pools: CephTestCluster
) -> None:
    disk = ref("clone")
    state = backend.create(disk, CreateRequest(0, FromStore(glance_image)))
    assert state.parent == f"{IMAGES}/glance-base@snap"
    assert state.virtual_size == 16 * MiB  # the parent's size is the minimum and default
    assert state.actual_size == 0  # copy-on-write: nothing of its own yet
    assert_pattern(read_disk(backend, disk, tmp_path))
    du = pools.rbd("du", "--format", "json", f"{POOL}/{backend.image(disk)}")
    assert '"used_size":0' in du.replace(" ", "")
    # Grow only, and the clone keeps sharing.
    state = backend.resize(disk, 64 * MiB)
    assert state.virtual_size == 64 * MiB and state.parent is not None
    backend.delete(disk)


def test_clone_refusals(backend: RbdBackend, glance_image: str, pools: CephTestCluster) -> None:
    with pytest.raises(ImageLargerThanDisk):
        backend.create(ref("small"), CreateRequest(8 * MiB, FromStore(glance_image)))
    foreign = glance_image.replace(pools.fsid, str(uuid.uuid4()))
    with pytest.raises(SourceNotInCluster, match="not in this node's cluster"):
        backend.create(ref("foreign"), CreateRequest(0, FromStore(foreign)))
    pools.rbd("snap", "create", f"{IMAGES}/glance-base@unprotected")
    try:
        with pytest.raises(PermanentError, match="not protected") as info:
            url = glance_image.removesuffix("/snap") + "/unprotected"
            backend.create(ref("unprotected"), CreateRequest(0, FromStore(url)))
        assert info.value.reason == "SourceNotProtected"
    finally:
        pools.rbd("snap", "rm", f"{IMAGES}/glance-base@unprotected")
    # Nothing half-made remains after the refusals.
    assert all("small" not in i and "unprotected" not in i for i in backend_images(pools))


def backend_images(pools: CephTestCluster) -> list[str]:
    return pools.rbd("ls", POOL).split()


def test_blank_with_filesystem(backend: RbdBackend, tmp_path: Path) -> None:
    disk = ref("blank")
    state = backend.create(disk, CreateRequest(32 * MiB, Blank("ext4")))
    assert state.virtual_size == 32 * MiB
    data = read_disk(backend, disk, tmp_path)
    assert read_at(data, 1024 + 56, 2) == b"\x53\xef"  # the ext4 superblock magic
    backend.delete(disk)


# -- snapshots, rollback, export, flatten, dependents ----------------------------------
def test_snapshot_rollback_export_remove(
    backend: RbdBackend, image_dir: Path, tmp_path: Path
) -> None:
    disk = ref("snap")
    backend.create(disk, CreateRequest(16 * MiB, FromImage(base_image(image_dir))))
    assert backend.create_snapshot(disk, "before") == 16 * MiB
    assert backend.create_snapshot(disk, "before") == 16 * MiB  # idempotent
    # Change the disk through qemu-io-free means: overwrite it with zeroes.
    readable = backend.readable(disk)
    zero = tmp_path / "zero.raw"
    zero.write_bytes(b"\0" * (16 * MiB))
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(zero), str(readable.path)],
        check=True,
    )
    assert read_at(read_disk(backend, disk, tmp_path), 0, 4) == b"\0\0\0\0"
    # Export the snapshot to a file in another format (what DiskSnapshot export does).
    exported = tmp_path / "export.qcow2"
    source = backend.readable(disk, "before")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source.path), str(exported)],
        check=True,
    )
    converted = tmp_path / "export.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(exported), str(converted)],
        check=True,
    )
    assert_pattern(converted)
    state = backend.rollback(disk, "before")
    assert state.restored_snapshot == "before"  # pinned: applied once
    assert backend.state(disk) == state
    assert_pattern(read_disk(backend, disk, tmp_path))
    backend.remove_snapshot(disk, "before")
    assert backend.snapshots(disk) == ()
    backend.remove_snapshot(disk, "before", ignore_missing=True)
    with pytest.raises(PermanentError, match="does not exist"):
        backend.remove_snapshot(disk, "before")
    backend.delete(disk)


def test_delete_refused_while_clones_depend_until_flattened(
    backend: RbdBackend, image_dir: Path, pools: CephTestCluster, tmp_path: Path
) -> None:
    parent = ref("parent")
    backend.create(parent, CreateRequest(16 * MiB, FromImage(base_image(image_dir))))
    backend.create_snapshot(parent, "gold")
    url = f"rbd://{pools.fsid}/{POOL}/{backend.image(parent)}/gold"
    child = ref("child")
    assert backend.create(child, CreateRequest(0, FromStore(url))).parent is not None
    with pytest.raises(HasDependents, match=backend.image(child)) as info:
        backend.delete(parent)
    assert "flatten" in info.value.message
    with pytest.raises(HasDependents):
        backend.remove_snapshot(parent, "gold")
    state = backend.flatten(child)
    assert state.parent is None and state.actual_size > 0
    backend.delete(parent)
    assert backend.state(parent) is None
    assert_pattern(read_disk(backend, child, tmp_path))
    backend.delete(child)


def test_direct_snapshot_into_another_pool(
    backend: RbdBackend, image_dir: Path, pools: CephTestCluster, tmp_path: Path
) -> None:
    disk = ref("direct")
    backend.create(disk, CreateRequest(16 * MiB, FromImage(base_image(image_dir))))
    url = backend.direct_snapshot(disk, "nightly", EXPORTS)
    assert url.startswith(f"rbd://{pools.fsid}/{EXPORTS}/vmdisk-snapshot_vms_nightly/snap")
    assert backend.direct_snapshot(disk, "nightly", EXPORTS) == url  # idempotent
    listing = pools.rbd("ls", "-l", "--format", "json", EXPORTS)
    assert "parent" not in listing  # flattened: independent of the disk
    # The disk's own snapshot can go; the published image stays usable.
    backend.remove_snapshot(disk, "nightly")
    child = ref("from-export")
    assert backend.create(child, CreateRequest(0, FromStore(url))).parent is not None
    assert_pattern(read_disk(backend, child, tmp_path))
    with pytest.raises(HasDependents):
        backend.remove_direct_snapshot(disk, "nightly", EXPORTS)
    backend.delete(child)
    backend.remove_direct_snapshot(disk, "nightly", EXPORTS)
    assert "nightly" not in pools.rbd("ls", EXPORTS)
    backend.delete(disk)


# -- the cluster going away ---------------------------------------------------------------
def test_stopped_osd_is_a_temporary_error_then_recovers(
    backend: RbdBackend, pools: CephTestCluster
) -> None:
    disk = ref("osd")
    backend.create(disk, CreateRequest(8 * MiB, Blank()))
    pools.pause_osd()
    try:
        started = time.monotonic()
        with pytest.raises(TemporaryError) as info:
            backend.resize(disk, 16 * MiB)
        assert time.monotonic() - started < 15  # bounded: op timeout 3 s, deadline 11 s
        assert info.value.reason in ("CephTimeout", "CephUnavailable")
    finally:
        pools.resume_osd()
    deadline = time.monotonic() + 30
    while True:  # the retry the engine would make, with backoff
        try:
            state = backend.resize(disk, 16 * MiB)
            break
        except TemporaryError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert state.virtual_size == 16 * MiB
    backend.delete(disk)


def test_connection_is_reused_and_thread_safe(backend: RbdBackend) -> None:
    disk = ref("threads")
    backend.create(disk, CreateRequest(4 * MiB, Blank()))
    cluster = backend.cluster(disk)
    errors: list[BaseException] = []

    def probe() -> None:
        try:
            for _ in range(5):
                assert backend.state(disk) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and backend.cluster(disk) is cluster
    backend.delete(disk)


# -- libvirt + QEMU ---------------------------------------------------------------------------
@pytest.mark.libvirtd
def test_qemu_boots_the_network_disk(
    backend: RbdBackend, image_dir: Path, pools: CephTestCluster, libvirt_system: object
) -> None:
    from libvirtd import boot_and_inspect

    disk = ref("boot")
    backend.create(disk, CreateRequest(16 * MiB, FromImage(base_image(image_dir))))
    location = backend.location(disk)
    hosts = [(h.name, h.port) for h in location.hosts]
    assert hosts == [("127.0.0.1", pools.mon_v1)]
    xml = render_disk(location, LibvirtSpec(cache="writeback"))
    assert '<source protocol="rbd" name="vms/' in xml and "<auth" not in xml
    opened = boot_and_inspect(libvirt_system, xml)
    assert any(backend.image(disk) in image.filename for image in opened), opened
    assert all(image.format == "raw" for image in opened)
    backend.delete(disk)


# -- the engine, end to end -------------------------------------------------------------------
@pytest.fixture
def rbd_settings(state_dir: Path, image_dir: Path, pools: CephTestCluster) -> Settings:
    return Settings(
        state_dir=state_dir,
        node_name="node-a",
        image_dirs=(image_dir,),
        rbd_pools=(POOL, EXPORTS),
        ceph_confs=(pools.conf,),
    )


def rbd_class(image_dir: Path) -> VMDiskClass:
    """The administrator's class: the pool, and file:// images from the test's directory."""
    spec = {"backend": "rbd", "parameters": {"pool": POOL}}
    spec["imageSources"] = {"fileDirs": [str(image_dir)]}
    return VMDiskClass.model_validate({"metadata": {"name": "rbd"}, "spec": spec})


def test_engine_end_to_end(rbd_settings: Settings, image_dir: Path) -> None:
    from vmdisk.engine.reconcile import Engine
    from vmdisk.local.store import LocalStore

    engine = Engine.build(rbd_settings)
    runner = LocalRunner(rbd_settings, engine, LocalStore(engine.layout))
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    raw = image_dir / "base.raw"
    source = {"image": {"url": raw.as_uri(), "checksum": sha256_of(raw), "format": "raw"}}
    disk = VMDisk.model_validate(
        {
            "metadata": {"name": name, "namespace": "vms"},
            "spec": {"backend": "rbd", "size": "32Mi", "source": source},
        }
    )
    snap = DiskSnapshot.model_validate(
        {
            "metadata": {"name": f"{name}-s", "namespace": "vms"},
            "spec": {"diskName": name, "export": {"pool": EXPORTS}},
        }
    )
    (_, made, snapped) = runner.apply([rbd_class(image_dir), disk, snap])
    assert isinstance(made, VMDisk) and made.status is not None
    assert made.status.phase == "Ready", made.status.conditions
    assert made.status.path == f"rbd:{POOL}/vmdisk_vms_{name}"
    assert made.status.shared is True and made.status.format == "raw"
    assert 'protocol="rbd"' in (made.status.libvirt_xml or "")
    assert isinstance(snapped, DiskSnapshot) and snapped.status is not None
    assert snapped.status.phase == "Ready", snapped.status.conditions
    url = snapped.status.export_url
    assert url is not None and url.endswith(f"/{EXPORTS}/vmdisk-snapshot_vms_{name}-s/snap")
    child = VMDisk.model_validate(
        {
            "metadata": {"name": f"{name}-c", "namespace": "vms"},
            "spec": {"backend": "rbd", "source": {"image": {"url": url}}},
        }
    )
    (cloned,) = runner.apply([child])
    assert isinstance(cloned, VMDisk) and cloned.status is not None
    assert cloned.status.phase == "Ready", cloned.status.conditions
    assert cloned.status.parent == f"{EXPORTS}/vmdisk-snapshot_vms_{name}-s@snap"
    # Refused while the clone depends on the published snapshot ...
    assert runner.delete([snap]) != []
    # ... until the clone is flattened.
    manifest = child.model_dump(by_alias=True, exclude_none=True)
    manifest["spec"]["rbd"] = {"flatten": True}
    flat = VMDisk.model_validate(manifest)
    (flattened,) = runner.apply([flat])
    assert isinstance(flattened, VMDisk) and flattened.status is not None
    assert flattened.status.phase == "Ready" and flattened.status.parent is None
    assert runner.delete([flattened, snap, made]) == []


# -- the trust boundary: a class may only name what the node allows ----------------------
@pytest.mark.parametrize(
    ("parameters", "reason", "field"),
    [
        ({"cephConf": "/etc/passwd"}, "ClassNotAllowed", "cephConf"),  # not a Ceph config
        ({"cephConf": "{foreign}"}, "ClassNotAllowed", "cephConf"),  # a working one, not listed
        ({"user": "admin"}, "ClassNotAllowed", "user"),  # client.admin
        ({"pool": IMAGES}, "ClassNotAllowed", "pool"),  # a real pool the node does not list
        ({"pool": "--pool=vms"}, "InvalidClass", "pool"),
        ({"pool": "vms/../x"}, "InvalidClass", "pool"),
        ({"user": "vmdisk:conf=/etc/passwd"}, "InvalidClass", "user"),
    ],
)
def test_a_class_cannot_reach_outside_the_nodes_ceph_settings(
    rbd_settings: Settings,
    pools: CephTestCluster,
    image_dir: Path,
    tmp_path: Path,
    parameters: dict[str, str],
    reason: str,
    field: str,
) -> None:
    """Refused before any Ceph connection is made; nothing appears in any pool."""
    from vmdisk.engine.reconcile import Engine
    from vmdisk.local.store import LocalStore

    foreign = tmp_path / "foreign.conf"
    foreign.write_text(pools.conf.read_text())
    params = {k: v.format(foreign=foreign) for k, v in parameters.items()}
    engine = Engine.build(rbd_settings)
    store = LocalStore(engine.layout)
    spec = {"backend": "rbd", "parameters": {"pool": POOL, **params}}
    store.apply(VMDiskClass.model_validate({"metadata": {"name": "evil"}, "spec": spec}))
    before = {p: pools.rbd("ls", p) for p in (POOL, IMAGES, EXPORTS)}
    name = f"evil-{uuid.uuid4().hex[:6]}"
    disk = VMDisk.model_validate(
        {
            "metadata": {"name": name, "namespace": "vms"},
            "spec": {"className": "evil", "size": "8Mi", "source": {"blank": {}}},
        }
    )
    status = engine.reconcile_disk(disk, store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", reason)
    assert f"spec.parameters.{field}" in status.conditions[-1].message
    engine.delete_disk(disk, store)  # never made: nothing to remove
    backend = engine.registry.get("rbd")
    assert isinstance(backend, RbdBackend) and backend._clusters == {}  # no connection at all
    assert {p: pools.rbd("ls", p) for p in (POOL, IMAGES, EXPORTS)} == before
    engine.close()


def test_the_backend_refuses_foreign_access_it_was_not_configured_for(
    backend: RbdBackend, pools: CephTestCluster, tmp_path: Path
) -> None:
    """Defence in depth: a reference with foreign parameters never reaches librados."""
    from vmdisk.backends.rbd_config import RbdParameters
    from vmdisk.errors import ClassNotAllowed

    foreign = tmp_path / "foreign.conf"
    foreign.write_text(pools.conf.read_text())
    for params in (
        RbdParameters(ceph_conf=str(foreign)),
        RbdParameters(user="admin"),
    ):
        with pytest.raises(ClassNotAllowed):
            backend.state(DiskRef("vms", "x", POOL, parameters=params))
    with pytest.raises(ClassNotAllowed):
        backend.state(DiskRef("vms", "x", IMAGES))
    assert backend._clusters == {}
