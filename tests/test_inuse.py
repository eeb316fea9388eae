"""Disks a running VM holds: offline-only operations wait, grows go online through libvirt.

Everything is real: the engine makes the disks, a real libvirtd starts a QEMU
domain on the XML the engine rendered, and QEMU itself (``query-block``,
``/proc/PID/fd``, ``blockInfo``) says what it sees.  A ``qemu-io`` process
stands in for a QEMU that libvirt does not know about.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PATTERN, Manifest, MiB, rbd_class, sha256_of
from libvirtd import qemu_open_files, query_block, running_domain
from vmdisk.api.common import Condition
from vmdisk.api.snapshot import DiskSnapshot
from vmdisk.api.vmdisk import VMDisk
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.host.domains import DomainDisk, Hypervisor, HypervisorUnavailable
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import LocalStore, Resource

pytestmark = pytest.mark.libvirtd

QEMU_FORMATS = {"raw": "raw", "qcow2": "qcow2", "ploop": "parallels"}
FIRST = PATTERN[0]  # what the image holds at offset 0


def ready_condition(obj: Resource) -> Condition:
    assert obj.status is not None
    return next(c for c in obj.status.conditions if c.type == "Ready")


def snapshot(name: str, disk_name: str) -> DiskSnapshot:
    return DiskSnapshot.model_validate(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": name, "namespace": "vms"},
            "spec": {"diskName": disk_name},
        }
    )


def with_spec(vm: VMDisk, **spec: Any) -> VMDisk:
    """``vm`` with some spec fields changed (validated, like an edit)."""
    body = vm.model_dump(by_alias=True, exclude_none=True)
    body["spec"].update(spec)
    return VMDisk.model_validate(body)


def qemu_io(path: Path, fmt: str, command: str, *, shared: bool = False) -> bytes:
    argv = ["qemu-io", "-f", fmt, "-c", command]
    if shared:  # read beside a running QEMU without asking for its lock
        argv += ["-r", "-U"]
    return subprocess.run([*argv, str(path)], check=True, capture_output=True).stdout


def first_bytes(path: Path, fmt: str, *, shared: bool = False) -> bytes:
    """The disk's first bytes as the guest sees them."""
    dump = qemu_io(path, fmt, f"read -v 0 {len(FIRST)}", shared=shared).decode()
    data = b""
    for line in dump.splitlines():
        if len(data) == len(FIRST) or ":" not in line:
            break
        hexes = line.split(":", 1)[1].split()[: min(16, len(FIRST) - len(data))]
        data += bytes(int(h, 16) for h in hexes)
    return data


def blocks(domain: Any) -> list[tuple[str, int]]:
    """QEMU's images and their sizes, top layer of each device."""
    return [
        (d["inserted"]["image"]["filename"], d["inserted"]["image"]["virtual-size"])
        for d in query_block(domain)
    ]


def guest_write(domain: Any, byte: int) -> None:
    """Write 4 KiB of ``byte`` at offset 0 through the running QEMU, as the guest would."""
    import libvirt_qemu

    (device,) = query_block(domain)
    command = f'qemu-io -d {device["qdev"]} "write -P {byte:#x} 0 4k"'
    hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    out = libvirt_qemu.qemuMonitorCommand(domain, command, hmp)
    assert "error" not in out.lower() and "fail" not in out.lower(), out


def target_of(xml: str) -> str:
    target = ET.fromstring(xml).find("target")
    assert target is not None
    return str(target.get("dev"))


def file_source(image_dir: Path) -> dict[str, Any]:
    image = image_dir / "base.qcow2"
    return {"image": {"url": image.as_uri(), "checksum": sha256_of(image)}}


# -- offline-only operations wait -------------------------------------------------------------
@pytest.mark.parametrize("backend", ["raw", "qcow2", "ploop"])
def test_restore_and_snapshot_wait_while_a_domain_holds_the_disk(
    libvirt_system: Any, runner: LocalRunner, disk: Manifest, image_dir: Path, backend: str
) -> None:
    vm = disk("held", backend, source=file_source(image_dir), size="32Mi")
    (made,) = runner.apply([vm])
    assert made.status is not None and made.status.phase == "Ready"
    path, fmt = Path(str(made.status.path)), QEMU_FORMATS[backend]
    (golden,) = runner.apply([snapshot("golden", "held")])
    assert golden.status is not None and golden.status.ready_to_use
    qemu_io(path, fmt, "write -P 0x5a 0 4k")  # written after the snapshot
    restore = with_spec(vm, restore={"snapshot": "golden"})

    with running_domain(libvirt_system, str(made.status.libvirt_xml)) as domain:
        inode, seen = path.stat().st_ino, blocks(domain)

        (refused,) = runner.apply([restore])
        (waiting,) = runner.apply([snapshot("live", "held")])

        if backend in ("raw", "ploop"):  # QEMU's backup job takes it live, the guest runs on
            assert waiting.status is not None and waiting.status.ready_to_use
            assert waiting.status.consistency == "CrashConsistent"  # no guest agent here
            held = [refused]
        else:  # nothing takes a qcow2 internal snapshot under a running QEMU
            assert waiting.status is not None and waiting.status.phase == "Pending"
            assert not waiting.status.ready_to_use
            assert not (path.parent / "snapshots" / "live").exists()
            held = [refused, waiting]
        for obj in held:
            condition = ready_condition(obj)
            assert (condition.status, condition.reason) == ("False", "DiskInUse")
            assert domain.name() in condition.message and "(will retry)" in condition.message
        assert refused.status is not None and refused.status.phase == "Ready"  # data usable
        assert refused.status.restored_snapshot is None
        # Nothing changed under the guest: same inode, still open, same image, same bytes.
        assert path.stat().st_ino == inode
        opened = qemu_open_files(domain)
        assert str(path) in opened and not any(f.endswith("(deleted)") for f in opened)
        assert blocks(domain) == seen
        assert first_bytes(path, fmt, shared=True) == b"\x5a" * len(FIRST)
        domain.destroy()

    # The same requests, retried, now go through.
    (restored,) = runner.apply([restore])
    assert restored.status is not None and restored.status.phase == "Ready"
    assert restored.status.restored_snapshot == "golden"
    assert first_bytes(path, fmt) == FIRST
    (live,) = runner.apply([snapshot("live", "held")])
    assert live.status is not None and live.status.ready_to_use, live.status
    assert live.status.consistency == ("Offline" if backend == "qcow2" else "CrashConsistent")


@pytest.mark.parametrize("backend", ["raw", "ploop"])
def test_live_snapshot_holds_what_the_guest_wrote_before_it(
    libvirt_system: Any, runner: LocalRunner, disk: Manifest, image_dir: Path, backend: str
) -> None:
    vm = disk("livecopy", backend, source=file_source(image_dir), size="32Mi")
    (made,) = runner.apply([vm])
    assert made.status is not None
    path, fmt = Path(str(made.status.path)), QEMU_FORMATS[backend]
    with running_domain(libvirt_system, str(made.status.libvirt_xml)) as domain:
        seen = blocks(domain)
        guest_write(domain, 0x11)
        (live,) = runner.apply([snapshot("mid", "livecopy")])
        assert live.status is not None and live.status.ready_to_use, live.status
        guest_write(domain, 0x22)
        assert first_bytes(path, fmt, shared=True) == b"\x22" * len(FIRST)
        # The domain runs on the same file: a backup leaves no trace in its disk.
        assert domain.isActive() and blocks(domain) == seen
        assert str(path) in qemu_open_files(domain)
        domain.destroy()
    copy = path.parent / "snapshots" / "mid"
    assert live.status.size is not None and live.status.size < 8 * MiB  # kept thin
    (restored,) = runner.apply([with_spec(vm, restore={"snapshot": "mid"})])
    assert restored.status is not None and restored.status.restored_snapshot == "mid"
    assert first_bytes(path, fmt) == b"\x11" * len(FIRST)
    assert copy.exists()
    assert first_bytes(copy, fmt) == b"\x11" * len(FIRST)
    assert not list(copy.parent.glob(".*"))  # no partial or backup file left


def test_clone_and_delete_wait_while_the_source_is_held(
    libvirt_system: Any, runner: LocalRunner, disk: Manifest, image_dir: Path
) -> None:
    (made,) = runner.apply([disk("src", "raw", source=file_source(image_dir), size="32Mi")])
    assert made.status is not None and made.status.phase == "Ready"
    clone = disk("copy", "raw", source={"disk": {"name": "src"}})

    xml = str(made.status.libvirt_xml)
    with running_domain(libvirt_system, xml) as domain:
        (waiting,) = runner.apply([clone])
        assert ready_condition(waiting).reason == "DiskInUse"
        assert (
            runner.engine.registry.get("raw").state(runner.engine.disk_ref(clone, runner.store))
            is None
        )
        domain.destroy()
    (copied,) = runner.apply([clone])
    assert copied.status is not None and copied.status.phase == "Ready"

    assert isinstance(made, VMDisk)
    with running_domain(libvirt_system, xml) as domain:
        problems = runner.delete([made])
        assert len(problems) == 1 and "DiskInUse" in problems[0], problems
        assert Path(str(made.status.path)).exists()
        domain.destroy()
    assert runner.delete([made]) == []
    assert not Path(str(made.status.path)).exists()


# -- online grow --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["raw", "qcow2"])
def test_grow_goes_online_through_libvirt(
    libvirt_system: Any, runner: LocalRunner, disk: Manifest, image_dir: Path, backend: str
) -> None:
    vm = disk("grow", backend, source=file_source(image_dir), size="32Mi")
    (made,) = runner.apply([vm])
    assert made.status is not None and made.status.phase == "Ready"
    xml = str(made.status.libvirt_xml)
    path = Path(str(made.status.path))

    with running_domain(libvirt_system, xml) as domain:
        started = domain.ID()
        (grown,) = runner.apply([with_spec(vm, size="64Mi")])

        assert grown.status is not None and grown.status.phase == "Ready", grown.status
        assert grown.status.resized_online is True
        assert grown.status.virtual_size == 64 * MiB
        # QEMU (and so the guest) sees the new size, without a restart.
        assert domain.ID() == started and domain.isActive()
        assert domain.blockInfo(target_of(xml))[0] == 64 * MiB
        assert blocks(domain) == [(str(path), 64 * MiB)]
        # The disk's identity did not move.
        assert (grown.status.path, grown.status.format) == (made.status.path, made.status.format)
        assert grown.status.libvirt_xml == xml
        domain.destroy()

    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", QEMU_FORMATS[backend], str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert '"virtual-size": 67108864' in info
    if backend == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", str(path)], check=True)
    assert first_bytes(path, QEMU_FORMATS[backend]) == FIRST


def test_ploop_cannot_grow_under_qemu_and_waits(
    libvirt_system: Any, runner: LocalRunner, disk: Manifest, image_dir: Path
) -> None:
    vm = disk("pgrow", "ploop", source=file_source(image_dir), size="32Mi")
    (made,) = runner.apply([vm])
    assert made.status is not None
    bigger = with_spec(vm, size="64Mi")
    with running_domain(libvirt_system, str(made.status.libvirt_xml)) as domain:
        seen = blocks(domain)
        (waiting,) = runner.apply([bigger])
        condition = ready_condition(waiting)
        assert condition.reason == "DiskInUse" and "ploop" in condition.message
        assert waiting.status is not None and waiting.status.virtual_size == 32 * MiB
        assert blocks(domain) == seen
        domain.destroy()
    (grown,) = runner.apply([bigger])
    assert grown.status is not None and grown.status.virtual_size == 64 * MiB
    assert grown.status.resized_online is False


# -- a holder libvirt does not know -------------------------------------------------------------
@pytest.fixture
def foreign_qemu() -> Iterator[Any]:
    """Start ``qemu-io`` (read-write, interactive) on a path: a QEMU outside libvirt."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path, fmt: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["qemu-io", "-f", fmt, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        from vmdisk.host.imagelocks import qemu_lock_held

        while not qemu_lock_held(path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-io did not lock the image"
            time.sleep(0.05)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        if proc.stdin:
            proc.stdin.close()


def test_image_lock_probe_sees_qemu_and_leaves_its_lock_alone(
    tmp_path: Path, foreign_qemu: Any
) -> None:
    from vmdisk.host.imagelocks import qemu_lock_held

    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    assert not qemu_lock_held(path)
    assert not qemu_lock_held(tmp_path / "missing")
    foreign_qemu(path, "qcow2")
    for _ in range(20):
        assert qemu_lock_held(path)
    # QEMU's lock is still there after all that probing: qemu-img is refused.
    argv = ["qemu-img", "resize", "-f", "qcow2", str(path), "32M"]
    refused = subprocess.run(argv, capture_output=True, text=True)
    assert refused.returncode != 0 and '"write" lock' in refused.stderr


def test_a_holder_outside_libvirt_refuses_grow_and_restore(
    libvirt_system: Any, runner: LocalRunner, disk: Manifest, image_dir: Path, foreign_qemu: Any
) -> None:
    vm = disk("foreign", "qcow2", source=file_source(image_dir), size="32Mi")
    (made,) = runner.apply([vm])
    assert made.status is not None
    path = Path(str(made.status.path))
    runner.apply([snapshot("first", "foreign")])
    proc = foreign_qemu(path, "qcow2")

    (grow,) = runner.apply([with_spec(vm, size="64Mi")])
    condition = ready_condition(grow)
    assert condition.reason == "DiskInUse"
    assert (
        "image lock" in condition.message and "not a domain of qemu:///system" in condition.message
    )
    assert grow.status is not None and grow.status.virtual_size == 32 * MiB
    (restore,) = runner.apply([with_spec(vm, size="64Mi", restore={"snapshot": "first"})])
    assert ready_condition(restore).reason == "DiskInUse"

    proc.kill()
    proc.wait()
    (done,) = runner.apply([with_spec(vm, size="64Mi", restore={"snapshot": "first"})])
    assert done.status is not None and done.status.phase == "Ready", done.status
    assert (done.status.virtual_size, done.status.restored_snapshot) == (64 * MiB, "first")
    assert done.status.resized_online is False


def test_no_libvirt_configured_still_sees_the_lock(
    settings: Any, disk: Manifest, image_dir: Path, foreign_qemu: Any
) -> None:
    from dataclasses import replace

    from vmdisk.engine.reconcile import Engine
    from vmdisk.local.store import LocalStore

    quiet = replace(settings, libvirt_uri=None)
    engine = Engine.build(quiet)
    assert engine.hypervisor is None
    runner = LocalRunner(quiet, engine, LocalStore(engine.layout))
    vm = disk(f"nolibvirt-{uuid.uuid4().hex[:6]}", "raw", source=file_source(image_dir))
    (made,) = runner.apply([vm])
    assert made.status is not None
    foreign_qemu(Path(str(made.status.path)), "raw")
    (grow,) = runner.apply([with_spec(vm, size="64Mi")])
    assert ready_condition(grow).reason == "DiskInUse"


# -- rbd on the suite's Ceph ----------------------------------------------------------------------
RBD_POOL = "inuse"


@pytest.fixture
def rbd_runner(state_dir: Path, image_dir: Path, ceph_cluster: Any) -> Iterator[LocalRunner]:
    from vmdisk.config import Settings
    from vmdisk.engine.reconcile import Engine
    from vmdisk.local.store import LocalStore

    ceph_cluster.create_pool(RBD_POOL)
    settings = Settings(
        state_dir=state_dir,
        node_name="node-a",
        image_dirs=(image_dir,),
        rbd_pools=(RBD_POOL,),
        ceph_confs=(ceph_cluster.conf,),
    )
    engine = Engine.build(settings)
    store = LocalStore(engine.layout)
    rbd_class(store, image_dir, RBD_POOL)
    yield LocalRunner(settings, engine, store)
    engine.close()


def rbd_size(ceph: Any, status_path: str) -> int:
    import json

    image = status_path.removeprefix("rbd:")
    return int(json.loads(ceph.rbd("info", "--format", "json", image))["size"])


def test_rbd_restore_waits_for_the_domain_and_a_live_snapshot_is_consistent(
    libvirt_system: Any, rbd_runner: LocalRunner, disk: Manifest, image_dir: Path, ceph_cluster: Any
) -> None:
    name = f"held-{uuid.uuid4().hex[:6]}"
    vm = disk(name, "rbd", source=file_source(image_dir), size="32Mi")
    (made,) = rbd_runner.apply([vm])
    assert made.status is not None and made.status.phase == "Ready", made.status
    (golden,) = rbd_runner.apply([snapshot(f"{name}-golden", name)])
    assert golden.status is not None and golden.status.consistency == "Offline"
    restore = with_spec(vm, restore={"snapshot": f"{name}-golden"})
    image = str(made.status.path)
    readable = Path(f"{image}:conf={ceph_cluster.conf}")

    with running_domain(libvirt_system, str(made.status.libvirt_xml)) as domain:
        seen = blocks(domain)
        (refused,) = rbd_runner.apply([restore])
        condition = ready_condition(refused)
        assert condition.reason == "DiskInUse" and domain.name() in condition.message
        assert blocks(domain) == seen

        # Live: the guest's write before the snapshot is in it, the one after is not.
        guest_write(domain, 0x11)
        assert first_bytes(readable, "raw", shared=True) == b"\x11" * len(FIRST)
        (live,) = rbd_runner.apply([snapshot(f"{name}-live", name)])
        assert live.status is not None and live.status.ready_to_use, live.status
        assert live.status.consistency == "CrashConsistent"  # no guest agent here
        guest_write(domain, 0x22)
        assert first_bytes(readable, "raw", shared=True) == b"\x22" * len(FIRST)
        assert domain.isActive() and blocks(domain) == seen
        domain.destroy()

    (restored,) = rbd_runner.apply([restore])
    assert restored.status is not None and restored.status.restored_snapshot == f"{name}-golden"
    assert first_bytes(readable, "raw") == FIRST
    (back,) = rbd_runner.apply([with_spec(vm, restore={"snapshot": f"{name}-live"})])
    assert back.status is not None and back.status.restored_snapshot == f"{name}-live"
    assert first_bytes(readable, "raw") == b"\x11" * len(FIRST)


def test_rbd_grows_online_through_libvirt(
    libvirt_system: Any, rbd_runner: LocalRunner, disk: Manifest, image_dir: Path, ceph_cluster: Any
) -> None:
    vm = disk(f"grow-{uuid.uuid4().hex[:6]}", "rbd", source=file_source(image_dir), size="32Mi")
    (made,) = rbd_runner.apply([vm])
    assert made.status is not None and made.status.phase == "Ready"
    xml = str(made.status.libvirt_xml)
    with running_domain(libvirt_system, xml) as domain:
        (grown,) = rbd_runner.apply([with_spec(vm, size="64Mi")])
        assert grown.status is not None and grown.status.phase == "Ready", grown.status
        assert grown.status.resized_online is True
        assert domain.isActive() and domain.blockInfo(target_of(xml))[0] == 64 * MiB
        assert [size for _, size in blocks(domain)] == [64 * MiB]
        assert (grown.status.path, grown.status.libvirt_xml) == (made.status.path, xml)
        domain.destroy()
    assert rbd_size(ceph_cluster, str(made.status.path)) == 64 * MiB


def test_rbd_client_outside_libvirt_refuses_grow(
    rbd_runner: LocalRunner, disk: Manifest, image_dir: Path, ceph_cluster: Any
) -> None:
    import rados
    import rbd

    vm = disk(f"watched-{uuid.uuid4().hex[:6]}", "rbd", source=file_source(image_dir), size="32Mi")
    (made,) = rbd_runner.apply([vm])
    assert made.status is not None
    image = str(made.status.path).removeprefix(f"rbd:{RBD_POOL}/")
    with (
        rados.Rados(conffile=str(ceph_cluster.conf)) as cluster,
        cluster.open_ioctx(RBD_POOL) as ioctx,
        rbd.Image(ioctx, image),  # opened read-write: it watches the image
    ):
        (grow,) = rbd_runner.apply([with_spec(vm, size="64Mi")])
        condition = ready_condition(grow)
        assert condition.reason == "DiskInUse" and "RBD client." in condition.message
        assert rbd_size(ceph_cluster, str(made.status.path)) == 32 * MiB
    (grown,) = rbd_runner.apply([with_spec(vm, size="64Mi")])
    assert grown.status is not None and grown.status.resized_online is False
    assert rbd_size(ceph_cluster, str(made.status.path)) == 64 * MiB


@pytest.fixture
def silent_libvirtd(tmp_path: Path) -> Iterator[str]:
    """A libvirt URI whose peer accepts and never answers: libvirtd hung (SIGSTOP-like).

    A real socket and the real libvirt client; only the daemon's silence is made up,
    because stopping the suite's shared libvirtd would stall the domains of other tests.
    """
    path = tmp_path / "hung.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])  # held open, never read or answered
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"qemu+unix:///system?socket={path}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_a_hung_libvirtd_bounds_every_call(silent_libvirtd: str) -> None:
    hypervisor = Hypervisor(silent_libvirtd, timeout=1.5)
    disk = DomainDisk("web", str(uuid.uuid4()), "vda")
    calls = {
        "list": lambda: hypervisor.disks_using(paths=["/var/lib/vmdisk/disks/vms/a/disk"]),
        "grow": lambda: hypervisor.block_resize(disk, 32 * MiB),
        "size": lambda: hypervisor.block_capacity(disk),
        "freeze": lambda: hypervisor.freeze(disk),
    }
    for what, call in calls.items():
        started = time.monotonic()
        with pytest.raises(HypervisorUnavailable, match=r"did not answer in 1\.5s"):
            call()
        assert time.monotonic() - started < 10, what


def test_a_hung_libvirtd_leaves_the_image_lock_to_decide(
    settings: Settings, engine: Engine, store: LocalStore, disk: Manifest, silent_libvirtd: str
) -> None:
    """Nothing holds the disk: a hung libvirtd delays the grow (by its bound), never blocks it."""
    hung = dataclasses.replace(engine, hypervisor=Hypervisor(silent_libvirtd, timeout=1.5))
    runner = LocalRunner(settings, hung, store)
    runner.apply([disk("free", "raw", source={"blank": {}}, size="4Mi")])
    (grown,) = runner.apply([disk("free", "raw", source={"blank": {}}, size="8Mi")])
    assert grown.status is not None and grown.status.virtual_size == 8 * MiB
    assert ready_condition(grown).reason == "Provisioned" and not grown.status.resized_online
