"""The LVM backend against real lvm2, device-mapper, cryptsetup and qemu-img.

Every test but the first needs device-mapper and is marked ``testvm``: on
this machine (no device-mapper) it runs inside the test VM
(tests/testvm.py), on a real node it runs where it is.  Each makes its own
VG on a loop device with a private lvm.conf (lvmfixtures.py).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import PATTERN, Manifest, read_at
from lvmfixtures import VolumeGroup, sh
from vmdisk.api.vmdiskclass import VMDiskClass
from vmdisk.backends.base import (
    BaseImage,
    Blank,
    CreateRequest,
    DiskRef,
    FromImage,
    SupportsCapacity,
    SupportsEncryption,
    SupportsInventory,
    SupportsSnapshots,
)
from vmdisk.backends.copysnap import SnapshotMissing
from vmdisk.backends.lvm import LvmBackend, LvmParameters, ThinPoolMissing
from vmdisk.backends.lvm_names import crypt_mapping, disk_lv, dm_escape, snapshot_lv
from vmdisk.backends.registry import Registry, default_registry
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.errors import (
    BackendUnavailable,
    ClassNotAllowed,
    DiskInUse,
    InsufficientCapacity,
    ThinPoolUnsafe,
)
from vmdisk.host.crypt import Crypt, WrongKey
from vmdisk.host.lvm import Lvm
from vmdisk.host.run import run
from vmdisk.layout import StateLayout
from vmdisk.local.store import LocalStore

MiB = 1024 * 1024
KEY = bytes(range(32))
THIN = LvmParameters(thin=True)
in_vm = pytest.mark.testvm


def image(image_dir: Path) -> BaseImage:
    return BaseImage("sha256-test", image_dir / "base.qcow2", "qcow2", 16 * MiB)


def same_content(image_path: Path, device: Path | str) -> bool:
    """qemu-img compare: the device holds the image, and zeroes past its end."""
    proc = run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image_path), str(device)]
    )
    return proc.stdout == ""


def allocated(vg: VolumeGroup, lv: str) -> int:
    volume = vg.lvm.volume(vg.name, lv)
    assert volume is not None and volume.data_percent is not None
    return int(volume.size * volume.data_percent / 100)


# Key slots with a small argon2id memory cost: the KDF under TCG emulation
# takes seconds per MiB.  The LUKS2 test below uses the real default.
FAST_KDF = Crypt(pbkdf_memory_kib=1024)


@pytest.fixture
def backend(volume_group: VolumeGroup) -> LvmBackend:
    return LvmBackend(volume_group.name, lvm=volume_group.lvm, crypt=FAST_KDF)


# -- names (pure) --------------------------------------------------------------------
def test_names_are_distinct_valid_and_short() -> None:
    pairs = [("vms", "a_b"), ("vms_a", "b"), ("vms", "a+ub"), ("vms", "a__b"), ("v", "ms_a_b")]
    names = {disk_lv("vg0", ns, n) for ns, n in pairs}
    assert len(names) == len(pairs)
    assert disk_lv("vg0", "vms", "web-root") == "vms_web-root"
    for reserved in ("db-snapshot", "pvmove-x", "cdata", "tmeta-1", "rimage"):
        lv = disk_lv("vg0", "vms", reserved)
        assert "snapshot" not in lv and "pvmove" not in lv and "_cdata" not in lv
        assert "_tmeta" not in lv and "_rimage" not in lv
    long_a, long_b = "x" * 250 + "a", "x" * 250 + "b"
    hashed = {disk_lv("vg0", "ns", long_a), disk_lv("vg0", "ns", long_b)}
    assert len(hashed) == 2 and all(len(dm_escape(n)) < 110 for n in hashed)
    assert snapshot_lv("vg0", "vms", "a", "s1") != disk_lv("vg0", "vms", "a_s1")
    assert crypt_mapping("vg-0", "vms_web-root") == "vmdisk_vg--0-vms_web--root"


def test_kernel_without_device_mapper_is_backend_unavailable(tmp_path: Path) -> None:
    """On this machine's kernel (no device-mapper), activation fails as BackendUnavailable.

    Inside the VM (or on a node) device-mapper exists; this one is about the host.
    """
    from testvm import device_mapper_available

    if device_mapper_available():
        pytest.skip("this kernel has device-mapper: nothing to refuse")
    from lvmfixtures import make_volume_group

    with (
        make_volume_group(tmp_path, 64 * MiB) as vg,
        pytest.raises(BackendUnavailable, match="device-mapper"),
    ):
        vg.lvm.create(vg.name, "nodm", 8 * MiB)


@in_vm
def test_kernel_without_the_thin_target_is_backend_unavailable(
    backend: LvmBackend, volume_group: VolumeGroup
) -> None:
    """A kernel that cannot load dm-thin-pool: sparse disks fail as BackendUnavailable."""
    from testvm import IN_VM

    if not IN_VM:
        pytest.skip("hides /sbin/modprobe, so it runs only in the disposable test VM")
    volume_group.thin_pool(16)
    volume_group.lvm_cmd("vgchange", "-an", volume_group.name)
    sh("modprobe", "-r", "dm_thin_pool")
    sh("mount", "--bind", "/bin/false", "/sbin/modprobe")
    try:
        with pytest.raises(BackendUnavailable, match="target"):
            backend.create(
                DiskRef("vms", "thin", volume_group.name, parameters=THIN),
                CreateRequest(8 * MiB, Blank()),
            )
    finally:
        sh("umount", "/sbin/modprobe")
    assert backend.state(DiskRef("vms", "thin", volume_group.name)) is None


@in_vm
def test_lvm_accepts_every_kind_of_name(volume_group: VolumeGroup) -> None:
    """The escaped names (reserved words, long names) are accepted and activated by lvm2."""
    lvm, vg = volume_group.lvm, volume_group.name
    names = [
        disk_lv(vg, "vms", "db-snapshot"),
        disk_lv(vg, "vms", "cdata"),
        disk_lv(vg, "n" * 63, "x" * 253),
        snapshot_lv(vg, "vms", "pvmove", "tmeta"),
    ]
    for name in names:
        lvm.create(vg, name, 4 * MiB)
    assert {v.name for v in lvm.volumes(vg)} == set(names)
    assert all(Path(f"/dev/{vg}/{name}").exists() for name in names)


# -- linear volumes ---------------------------------------------------------------------
@in_vm
def test_linear_disk_from_an_image_reads_back_and_grows(
    backend: LvmBackend, volume_group: VolumeGroup, image_dir: Path
) -> None:
    # Old data on the PV, as a deleted disk would leave it: must not show through.
    sh("dd", "if=/dev/urandom", f"of={volume_group.pv}", "bs=1M", "seek=1", "count=100",
       "conv=notrunc", "status=none")  # fmt: skip
    ref = DiskRef("vms", "web-root", volume_group.name)
    state = backend.create(ref, CreateRequest(24 * MiB, FromImage(image(image_dir))))
    assert (state.format, state.virtual_size, state.base_image) == ("raw", 24 * MiB, "sha256-test")
    location = backend.location(ref)
    assert (location.type, location.path) == ("block", f"/dev/{volume_group.name}/vms_web-root")
    device = backend.readable(ref).path
    assert same_content(image_dir / "base.qcow2", device)  # image, then a zeroed tail

    state = backend.resize(ref, 40 * MiB)
    assert state.virtual_size == 40 * MiB
    assert int(sh("blockdev", "--getsize64", str(device))) == 40 * MiB
    assert same_content(image_dir / "base.qcow2", device) or read_at(device, 0, 18) == PATTERN[0]
    for offset, data in PATTERN.items():
        assert read_at(device, offset, len(data)) == data
    assert backend.inventory() == [ref]
    for protocol in (SupportsSnapshots, SupportsInventory, SupportsCapacity, SupportsEncryption):
        assert isinstance(backend, protocol)

    backend.delete(ref)
    assert backend.state(ref) is None and not device.exists()
    assert volume_group.lvm.volumes(volume_group.name) == []


@in_vm
def test_blank_filesystem_grows_with_the_volume(
    backend: LvmBackend, volume_group: VolumeGroup
) -> None:
    ref = DiskRef("vms", "data", volume_group.name)
    backend.create(ref, CreateRequest(16 * MiB, Blank("ext4")))
    backend.resize(ref, 32 * MiB)
    device = backend.readable(ref).path
    sh("e2fsck", "-fn", str(device))
    out = sh("dumpe2fs", "-h", str(device))
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert int(fields["Block count"]) * int(fields["Block size"]) == 32 * MiB


@in_vm
def test_full_volume_group_is_insufficient_capacity_and_leaves_nothing(
    backend: LvmBackend, volume_group: VolumeGroup
) -> None:
    ref = DiskRef("vms", "huge", volume_group.name)
    with pytest.raises(InsufficientCapacity) as caught:
        backend.create(ref, CreateRequest(1024 * MiB, Blank()))
    assert caught.value.reason == "InsufficientCapacity" and caught.value.permanent
    assert volume_group.lvm.volumes(volume_group.name) == []
    capacity = backend.capacity()
    assert capacity.free == capacity.size > 100 * MiB


@in_vm
def test_failure_midway_removes_the_half_made_volume(
    backend: LvmBackend, volume_group: VolumeGroup, tmp_path: Path
) -> None:
    ref = DiskRef("vms", "broken", volume_group.name)
    missing = BaseImage("sha256-gone", tmp_path / "gone.qcow2", "qcow2", 4 * MiB)
    with pytest.raises(Exception, match="qemu-img"):
        backend.create(ref, CreateRequest(8 * MiB, FromImage(missing)))
    assert volume_group.lvm.volumes(volume_group.name) == []
    assert backend.state(ref) is None


# -- thick snapshots ------------------------------------------------------------------------
@in_vm
def test_thick_snapshot_survives_a_full_overwrite_and_rolls_back_by_merge(
    backend: LvmBackend, volume_group: VolumeGroup, image_dir: Path
) -> None:
    ref = DiskRef("vms", "snappy", volume_group.name)
    backend.create(ref, CreateRequest(24 * MiB, FromImage(image(image_dir))))
    backend.create_snapshot(ref, "before")
    device = backend.readable(ref).path
    # Every byte of the origin changes: the COW area must hold all of it.
    sh("dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=24", "oflag=direct",
       "status=none")  # fmt: skip
    snap = volume_group.lvm.volume(volume_group.name, "vms_snappy_before")
    assert snap is not None and snap.attr[4] == "a", snap.attr  # "I" would be invalidated
    assert same_content(image_dir / "base.qcow2", backend.readable(ref, "before").path)

    state = backend.rollback(ref, "before")
    assert state.restored_snapshot == "before"
    assert same_content(image_dir / "base.qcow2", backend.readable(ref).path)
    assert backend.snapshots(ref) == ("before",)  # taken again after the merge
    backend.delete(ref)
    assert backend.state(ref) is None and volume_group.lvm.volumes(volume_group.name) == []


class Killed(Exception):
    """Stands in for a kill -9 at one point of a rollback."""


@in_vm
def test_a_rollback_cut_off_after_its_merge_is_finished_by_the_next(
    backend: LvmBackend, volume_group: VolumeGroup, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = DiskRef("vms", "cut", volume_group.name)
    backend.create(ref, CreateRequest(24 * MiB, FromImage(image(image_dir))))
    backend.create_snapshot(ref, "before")
    device = backend.readable(ref).path
    sh("dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=4", "oflag=direct",
       "status=none")  # fmt: skip

    def killed(*_: object) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(backend, "_take_snapshot", killed)  # the merge has run, nothing after
        with pytest.raises(Killed):
            backend.rollback(ref, "before")
    assert backend.snapshots(ref) == ()  # consumed by the merge
    state = backend.rollback(ref, "before")  # the retry the engine makes
    assert state.restored_snapshot == "before"
    assert same_content(image_dir / "base.qcow2", backend.readable(ref).path)
    assert backend.snapshots(ref) == ("before",)
    origin = volume_group.lvm.volume(volume_group.name, disk_lv(volume_group.name, "vms", "cut"))
    assert origin is not None and origin.tag_value("vmdisk.merging") is None
    with pytest.raises(SnapshotMissing):  # a snapshot that never was is still missing
        backend.rollback(ref, "never")


@in_vm
def test_deleting_a_thick_snapshot_leaves_the_open_origin_alone(
    backend: LvmBackend, volume_group: VolumeGroup, image_dir: Path
) -> None:
    ref = DiskRef("vms", "busy", volume_group.name)
    backend.create(ref, CreateRequest(24 * MiB, FromImage(image(image_dir))))
    backend.create_snapshot(ref, "s1")
    device = backend.readable(ref).path
    with open(device, "rb") as held:  # a VM has the disk open
        backend.remove_snapshot(ref, "s1")
        assert held.read(18) == PATTERN[0]
    origin = volume_group.lvm.volume(volume_group.name, "vms_busy")
    assert origin is not None and origin.active and not origin.thick_origin
    assert backend.snapshots(ref) == ()


@in_vm
def test_thick_disk_with_a_snapshot_grows(
    backend: LvmBackend, volume_group: VolumeGroup, image_dir: Path
) -> None:
    ref = DiskRef("vms", "grow", volume_group.name)
    backend.create(ref, CreateRequest(16 * MiB, FromImage(image(image_dir))))
    backend.create_snapshot(ref, "s1")
    state = backend.resize(ref, 32 * MiB)
    assert state.virtual_size == 32 * MiB
    device = backend.readable(ref).path
    assert int(sh("blockdev", "--getsize64", str(device))) == 32 * MiB
    snapshot = backend.readable(ref, "s1").path
    assert int(sh("blockdev", "--getsize64", str(snapshot))) == 16 * MiB
    assert same_content(image_dir / "base.qcow2", snapshot)
    backend.rollback(ref, "s1")
    assert read_at(backend.readable(ref).path, 5 * MiB, 19) == PATTERN[5 * MiB]


@in_vm
def test_thick_disk_with_a_snapshot_waits_to_grow_while_a_vm_holds_it(
    backend: LvmBackend, volume_group: VolumeGroup, image_dir: Path
) -> None:
    """The online path refuses before touching the LV: lvm2 would have to deactivate it."""
    ref = DiskRef("vms", "held", volume_group.name)
    backend.create(ref, CreateRequest(16 * MiB, FromImage(image(image_dir))))
    backend.create_snapshot(ref, "s1")
    with pytest.raises(DiskInUse, match="thick snapshots"):
        backend.prepare_online_grow(ref, 32 * MiB)
    origin = volume_group.lvm.volume(volume_group.name, disk_lv(volume_group.name, "vms", "held"))
    assert origin is not None and origin.active and origin.size == 16 * MiB
    backend.remove_snapshot(ref, "s1")
    backend.prepare_online_grow(ref, 32 * MiB)  # no snapshot: lvextend on the active LV
    assert int(sh("blockdev", "--getsize64", str(backend.readable(ref).path))) == 32 * MiB


# -- thin volumes --------------------------------------------------------------------------
@in_vm
def test_sparse_without_thin_pool_says_what_to_do(
    backend: LvmBackend, volume_group: VolumeGroup
) -> None:
    ref = DiskRef("vms", "thin", volume_group.name, parameters=THIN)
    with pytest.raises(ThinPoolMissing, match="lvcreate --type thin-pool"):
        backend.create(ref, CreateRequest(8 * MiB, Blank()))


@in_vm
def test_thin_disk_from_an_image_stays_sparse_grows_snapshots_and_rolls_back(
    backend: LvmBackend, volume_group: VolumeGroup, image_dir: Path
) -> None:
    volume_group.thin_pool(64)
    ref = DiskRef("vms", "thin", volume_group.name, parameters=THIN)
    state = backend.create(ref, CreateRequest(200 * MiB, FromImage(image(image_dir))))
    assert state.virtual_size == 200 * MiB and state.actual_size < 2 * MiB  # the pattern only
    device = backend.readable(ref).path
    assert same_content(image_dir / "base.qcow2", device)

    backend.create_snapshot(ref, "s1")
    with open(device, "r+b") as handle:
        handle.write(b"overwritten")
    backend.resize(ref, 256 * MiB)  # a thin origin grows while active
    assert int(sh("blockdev", "--getsize64", str(device))) == 256 * MiB
    assert read_at(backend.readable(ref, "s1").path, 0, 18) == PATTERN[0]
    backend.rollback(ref, "s1")
    assert read_at(backend.readable(ref).path, 0, 18) == PATTERN[0]
    assert backend.snapshots(ref) == ("s1",)
    assert backend.capacity().thin_pool_free is not None
    backend.delete(ref)
    assert [v.name for v in volume_group.lvm.volumes(volume_group.name)] == ["vmdisk-thinpool"]


@in_vm
def test_thin_pool_that_does_not_zero_is_refused_for_plain_disks(
    backend: LvmBackend, volume_group: VolumeGroup
) -> None:
    volume_group.thin_pool(32, zero=False)
    with pytest.raises(ThinPoolUnsafe, match="lvchange -Zy"):
        backend.create(
            DiskRef("vms", "plain", volume_group.name, parameters=THIN),
            CreateRequest(16 * MiB, Blank()),
        )
    encrypted = DiskRef("vms", "enc", volume_group.name, encrypted=True, parameters=THIN)
    backend.create(encrypted, CreateRequest(16 * MiB, Blank(), encryption_key=KEY))
    backend.delete(encrypted)


# -- dm-crypt ------------------------------------------------------------------------------
@in_vm
def test_luks2_with_the_key_only_on_stdin_and_a_wrong_key_refused(
    volume_group: VolumeGroup, image_dir: Path
) -> None:
    calls: list[tuple[list[str], str | None]] = []

    def recording(argv: list[str], **kwargs: object) -> object:
        calls.append((list(argv), kwargs.get("input_data")))  # type: ignore[arg-type]
        return run(argv, **kwargs)  # type: ignore[arg-type]

    backend = LvmBackend(
        volume_group.name,
        lvm=replace(volume_group.lvm, runner=recording),  # type: ignore[arg-type]
        crypt=Crypt(runner=recording),  # type: ignore[arg-type]
    )
    ref = DiskRef("vms", "secret", volume_group.name, encrypted=True)
    request = CreateRequest(24 * MiB, FromImage(image(image_dir)), encryption_key=KEY)
    assert backend.create(ref, request).virtual_size == 24 * MiB
    path = Path(backend.location(ref).path)
    assert path == Path("/dev/mapper") / crypt_mapping(volume_group.name, "vms_secret")
    # The image, decrypted; the tail past it is noise, as on any fresh dm-crypt device.
    sh("cmp", "-n", str(16 * MiB), str(image_dir / "base.raw"), str(path))
    raw = Path(f"/dev/{volume_group.name}/vms_secret")
    dump = sh("cryptsetup", "luksDump", str(raw))
    assert "Version:       \t2" in dump and "offset: 16777216 [bytes]" in dump
    assert "argon2id" in dump and "Memory:     65536" in dump
    assert PATTERN[0] not in read_at(raw, 16 * MiB, MiB)  # ciphertext below

    backend.crypt.close(crypt_mapping(volume_group.name, "vms_secret"))  # as after a reboot
    assert not path.exists()
    with pytest.raises(WrongKey):
        backend.unlock(ref, b"not the key")
    assert not path.exists()
    backend.unlock(ref, KEY)
    backend.resize(ref, 32 * MiB)
    assert int(sh("blockdev", "--getsize64", str(path))) == 32 * MiB
    assert read_at(path, 5 * MiB, 19) == PATTERN[5 * MiB]
    backend.delete(ref)
    assert not path.exists() and volume_group.lvm.volumes(volume_group.name) == []

    assert all(KEY.hex() not in " ".join(argv) for argv, _ in calls)
    assert {stdin for argv, stdin in calls if argv[0] == "cryptsetup" and stdin} == {
        KEY.hex(),
        b"not the key".hex(),
    }


@in_vm
def test_encrypted_thin_disk_stays_sparse(backend: LvmBackend, volume_group: VolumeGroup) -> None:
    volume_group.thin_pool(64)
    ref = DiskRef("vms", "enc", volume_group.name, encrypted=True, parameters=THIN)
    state = backend.create(ref, CreateRequest(256 * MiB, Blank("ext4"),
                                              encryption_key=KEY))  # fmt: skip
    assert state.virtual_size == 256 * MiB
    # The LUKS2 header area and the filesystem's metadata, not 256 MiB of ciphertext.
    assert allocated(volume_group, "vms_enc") < 40 * MiB
    sh("e2fsck", "-fn", backend.location(ref).path)
    backend.delete(ref)


# -- through the engine (local mode) --------------------------------------------------
def lvm_class(name: str, **spec: Any) -> VMDiskClass:
    return VMDiskClass.model_validate(
        {"metadata": {"name": name}, "spec": {"backend": "lvm", **spec}}
    )


@pytest.fixture
def lvm_engine(settings: Settings, volume_group: VolumeGroup) -> Engine:
    settings = replace(settings, lvm_vgs=(volume_group.name,))
    layout = StateLayout(settings.state_dir)
    lvm = LvmBackend(volume_group.name, lvm=volume_group.lvm, crypt=FAST_KDF)
    registry = default_registry(replace(settings, lvm_vgs=()), layout)
    return Engine.build(settings, Registry({**registry.backends, "lvm": lvm}))


@in_vm
def test_engine_makes_an_lvm_disk_ready_with_block_xml(
    lvm_engine: Engine, volume_group: VolumeGroup, disk: Manifest
) -> None:
    engine, settings = lvm_engine, lvm_engine.settings
    store = LocalStore(engine.layout)
    store.apply(lvm_class("fast", parameters={"volumeGroup": volume_group.name}))
    obj = disk("web-root", "lvm", source={"blank": {"filesystem": "ext4"}}, size="16Mi")
    status = engine.reconcile_disk(obj, store)
    assert (status.phase, status.conditions[-1].reason) == ("Pending", "ClassNotFound")
    obj = obj.model_copy(update={"spec": obj.spec.model_copy(update={"class_name": "fast"})})
    status = engine.reconcile_disk(obj, store)
    assert status.phase == "Ready", status.conditions
    assert status.path == f"/dev/{volume_group.name}/vms_web-root"
    assert os.path.exists(status.path)
    assert status.format == "raw" and status.virtual_size == 16 * MiB
    assert status.pinned_class is not None and status.pinned_class.name == "fast"
    assert status.pinned_class.parameters["volumeGroup"] == volume_group.name
    assert status.libvirt_xml is not None and '<disk type="block"' in status.libvirt_xml
    assert 'io="native"' in status.libvirt_xml

    key = {"encryption": {"keySecretRef": {"name": "k", "key": "key"}}}
    store.apply(lvm_class("sealed", **key))
    secret = disk("enc", "lvm", source={"blank": {}}, size="16Mi", className="sealed")
    status = engine.reconcile_disk(secret, store)
    assert (status.phase, status.conditions[-1].reason) == ("Pending", "SecretNotFound")  # retried
    # The key is read from the agent's own namespace, never the disk's.
    where = settings.state_dir / "secrets" / settings.namespace / "k" / "key"
    assert str(where) in status.conditions[-1].message
    store.apply(VMDiskClass.model_validate({"metadata": {"name": "raw-sealed"},
                                            "spec": {"backend": "raw", **key}}))  # fmt: skip
    on_raw = disk("raw-enc", "raw", source={"blank": {}}, size="16Mi", className="raw-sealed")
    status = engine.reconcile_disk(on_raw, store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "Unsupported")
    assert volume_group.lvm.volumes(volume_group.name, tag="vmdisk.luks2") == []


def _foreign_lv(volume_group: VolumeGroup, name: str) -> None:
    """An LV that is not ours but wears our tags: what an injected VG name would adopt."""
    volume_group.lvm.create(
        volume_group.name, name, 4 * MiB, tags=["vmdisk", "vmdisk.disk=vms/victim"]
    )


@in_vm
@pytest.mark.parametrize(
    ("volume_group_name", "reason"),
    [
        ("--select=vg_name={vg}||lv_name=", "InvalidClass"),  # an option, by its looks
        ("-ay", "InvalidClass"),
        ("other-vg", "ClassNotAllowed"),  # well-formed, but not one VMDISK_LVM_VG allows
        ("{vg}/x", "InvalidClass"),
    ],
)
@in_vm
def test_a_class_cannot_reach_outside_the_allowed_volume_groups(
    lvm_engine: Engine,
    volume_group: VolumeGroup,
    disk: Manifest,
    volume_group_name: str,
    reason: str,
) -> None:
    """The issue's injection: nothing is adopted, nothing removed, no lvm command runs."""
    engine, store = lvm_engine, LocalStore(lvm_engine.layout)
    _foreign_lv(volume_group, "vms_victim")
    before = volume_group.lvm.volumes(volume_group.name)
    vg = volume_group_name.format(vg=volume_group.name)
    store.apply(lvm_class("evil", parameters={"volumeGroup": vg}))
    victim = disk("victim", "lvm", source={"blank": {}}, size="4Mi", className="evil")
    calls: list[list[str]] = []
    lvm = engine.registry.get("lvm")
    assert isinstance(lvm, LvmBackend)
    recording = replace(
        lvm.lvm, runner=lambda argv, **kw: calls.append(list(argv)) or run(argv, **kw)
    )
    lvm.lvm = recording
    status = engine.reconcile_disk(victim, store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", reason)
    assert "spec.parameters.volumeGroup" in status.conditions[-1].message
    engine.delete_disk(victim, store)  # never pinned: nothing to remove, nothing run
    assert calls == []
    assert volume_group.lvm.volumes(volume_group.name) == before


@in_vm
def test_the_backend_refuses_a_volume_group_it_was_not_given(
    backend: LvmBackend, volume_group: VolumeGroup
) -> None:
    """Defence in depth: a reference naming another VG never reaches lvm either."""
    from vmdisk.errors import UnsafeName

    _foreign_lv(volume_group, "vms_victim")
    with pytest.raises(ClassNotAllowed):
        backend.state(DiskRef("vms", "victim", "other-vg"))
    with pytest.raises(ClassNotAllowed):
        backend.delete(DiskRef("vms", "victim", f"--select=vg_name={volume_group.name}"))
    with pytest.raises(UnsafeName):
        volume_group.lvm.remove("--select=vg_name=x", "lv")
    assert [v.name for v in volume_group.lvm.volumes(volume_group.name)] == ["vms_victim"]


@in_vm
def test_a_class_edit_never_moves_an_existing_disk(
    lvm_engine: Engine, volume_group: VolumeGroup, disk: Manifest, tmp_path: Path
) -> None:
    """Parameters are pinned at creation; limits apply to what the disk asks next."""
    engine, store = lvm_engine, LocalStore(lvm_engine.layout)
    store.apply(lvm_class("db", parameters={"volumeGroup": volume_group.name},
                          limits={"maxSize": "32Mi"}))  # fmt: skip
    obj = disk("db", "lvm", source={"blank": {}}, size="16Mi", className="db")
    first = engine.reconcile_disk(obj, store)
    assert first.phase == "Ready", first.conditions
    # The administrator points the class elsewhere (thin, another pool name).
    moved = {"volumeGroup": volume_group.name, "thin": True, "thinPool": "gone"}
    store.apply(lvm_class("db", parameters=moved, limits={"maxSize": "20Mi"}))
    made = obj.model_copy(update={"status": first})
    again = engine.reconcile_disk(made, store)
    assert again.phase == "Ready" and again.pinned_class == first.pinned_class
    assert again.path == first.path and again.virtual_size == 16 * MiB
    lv = volume_group.lvm.volume(volume_group.name, "vms_db")
    assert lv is not None and lv.segtype == "linear"  # still thick
    # A grow beyond the class's current limit is refused with its reason, and nothing changes.
    bigger = made.model_copy(update={"spec": made.spec.model_copy(update={"size": "24Mi"})})
    refused = engine.reconcile_disk(bigger, store)
    change = next(c for c in refused.conditions if c.type == "ChangeRefused")
    assert (refused.phase, change.reason) == ("Ready", "ExceedsClassLimit")
    assert "maxSize: 20Mi" in change.message
    lv = volume_group.lvm.volume(volume_group.name, "vms_db")
    assert lv is not None and lv.size == 16 * MiB


@in_vm
def test_a_pinned_class_is_still_bounded_by_the_settings(
    lvm_engine: Engine, volume_group: VolumeGroup, disk: Manifest
) -> None:
    """A status naming another VG (hand-edited, or settings narrowed since) is refused."""
    engine, store = lvm_engine, LocalStore(lvm_engine.layout)
    store.apply(lvm_class("db", parameters={"volumeGroup": volume_group.name}))
    obj = disk("db", "lvm", source={"blank": {}}, size="8Mi", className="db")
    made = engine.reconcile_disk(obj, store)
    assert made.phase == "Ready" and made.pinned_class is not None
    _foreign_lv(volume_group, "vms_victim")
    before = volume_group.lvm.volumes(volume_group.name)
    forged = made.pinned_class.model_copy(update={"parameters": {"volumeGroup": "other-vg"}})
    status = made.model_copy(update={"pinned_class": forged})
    victim = disk("victim", "lvm", source={"blank": {}}, size="8Mi", className="db")
    forged_disk = victim.model_copy(update={"status": status})
    result = engine.reconcile_disk(forged_disk, store)
    ready = next(c for c in result.conditions if c.type == "Ready")
    assert (result.phase, ready.reason) == ("Failed", "ClassNotAllowed")
    with pytest.raises(ClassNotAllowed):
        engine.delete_disk(forged_disk, store)
    assert volume_group.lvm.volumes(volume_group.name) == before


@in_vm
def test_a_new_disk_above_the_class_limit_is_refused_before_anything_is_made(
    lvm_engine: Engine, volume_group: VolumeGroup, disk: Manifest
) -> None:
    engine, store = lvm_engine, LocalStore(lvm_engine.layout)
    store.apply(lvm_class("small", limits={"maxSize": "8Mi", "iotune": {"totalIopsSec": 100}}))
    big = disk("big", "lvm", source={"blank": {}}, size="16Mi", className="small")
    status = engine.reconcile_disk(big, store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "ExceedsClassLimit")
    assert status.pinned_class is None  # nothing made, nothing pinned
    fast = disk("fast", "lvm", source={"blank": {}}, size="4Mi", className="small",
                libvirt={"iotune": {"totalIopsSec": 500}})  # fmt: skip
    status = engine.reconcile_disk(fast, store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "ExceedsClassLimit")
    assert volume_group.lvm.volumes(volume_group.name) == []
    # Asking for nothing gets the class's limit in the domain XML.
    plain = disk("plain", "lvm", source={"blank": {}}, size="4Mi", className="small")
    status = engine.reconcile_disk(plain, store)
    assert status.phase == "Ready", status.conditions
    assert (
        status.libvirt_xml is not None
        and "<total_iops_sec>100</total_iops_sec>" in status.libvirt_xml
    )


@in_vm
def test_volume_group_capacity_reaches_the_metrics(
    backend: LvmBackend, volume_group: VolumeGroup, tmp_path: Path
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vmdisk.operator.metrics import Metrics

    engine = Engine.build(
        Settings(state_dir=tmp_path / "state"), registry=Registry({"lvm": backend})
    )
    backend.create(DiskRef("vms", "used", volume_group.name), CreateRequest(16 * MiB, Blank()))
    metrics = Metrics("node-a")
    metrics.watch_engine(engine)
    samples = {
        (sample.name, sample.labels.get("placement")): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
        if sample.labels.get("backend") == "lvm"
    }
    capacity = backend.capacity()
    assert samples[("vmdisk_backend_free_bytes", volume_group.name)] == capacity.free
    assert samples[("vmdisk_backend_size_bytes", volume_group.name)] == capacity.size
    assert capacity.size - capacity.free >= 16 * MiB


def test_lvm_runs_without_udev_and_never_reads_a_terminal() -> None:
    """Argv contract a real run cannot show: the environment every lvm2 call gets.

    In a pod without the host's IPC namespace, udev-synchronised activation
    waits forever; the VM has no udevd at all, so it cannot tell.
    """
    seen: list[dict[str, str]] = []

    def recording(argv: list[str], **kwargs: object) -> object:
        seen.append(dict(kwargs["env"]))  # type: ignore[call-overload]
        raise BackendUnavailable("stop here")

    with pytest.raises(BackendUnavailable):
        Lvm(runner=recording).create("vg0", "lv", MiB)  # type: ignore[arg-type]
    assert seen == [{"DM_DISABLE_UDEV": "1", "LVM_SUPPRESS_FD_WARNINGS": "1"}]
    assert run(["cat"]).stdout == ""  # stdin is /dev/null, not the caller's terminal
