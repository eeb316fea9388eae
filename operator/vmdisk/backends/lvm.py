"""The LVM backend (Nova's Lvm): one logical volume per disk in a volume group.

* The class names the volume group (one the node's ``VMDISK_LVM_VG`` allows)
  and thick or thin.  Thick disks are linear LVs; thin ones are thin LVs in
  the volume group's thin pool (``vmdisk-thinpool`` unless the class names
  another), which an administrator creates once.  Not ``lvcreate --virtualsize`` without a pool:
  current LVM turns that into one private thin pool per disk (metadata,
  spare and free space fragmented per disk), and the older "snapshot of
  zero" kind it replaced is invalidated for good when its COW area fills.
* Everything an LV is besides its bytes is pinned in LV tags (owner, disk
  name, filesystem, base image, LUKS2, restored snapshot), so the LVM
  metadata is the one record; a ``vmdisk.partial`` tag marks a volume that
  is still being made, and any failure removes it (Nova's
  remove_volume_on_error), mapping included.
* Nothing of a deleted disk may show through.  New thick volumes are
  zeroed where the copy does not write (their extents may hold old data).
  A new thin volume reads as zeroes everywhere, so a copy into it skips the
  zeroes (``--target-is-zero``) and the volume stays sparse; the pool must
  zero newly provisioned blocks (``lvcreate -Zy``, lvm2's default), or a
  guest's partial write would expose the rest of an old chunk, so a pool
  made with ``-Zn`` is refused (ThinPoolUnsafe).
* Encrypted disks (``DiskRef.encrypted``, key in ``CreateRequest``) are LUKS2
  inside the LV and are used through ``/dev/mapper/vmdisk_<vg>-<lv>``.
  Whatever was on the extents before decrypts to noise under the new key,
  so they are never zeroed: a blank encrypted disk reads as noise until
  written (like any fresh dm-crypt device) and an encrypted thin disk stays
  sparse; an image is copied whole, its zeroes included (they are data to
  the guest, and zeroes below dm-crypt would not read as zeroes above it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Self

from pydantic import Field

from ..config import Settings
from ..errors import (
    ClassNotAllowed,
    DiskInUse,
    DiskMissing,
    InvalidSpec,
    PermanentError,
    ThinPoolUnsafe,
    UnsupportedOperation,
)
from ..host import blockdev, qemu_img
from ..host.crypt import HEADER_BYTES, Crypt
from ..host.imagelocks import qemu_lock_held
from ..host.lvm import LogicalVolume, Lvm
from ..host.mkfs import make_filesystem
from ..host.names import LVM_NAME_PATTERN, check_lvm_name
from ..layout import StateLayout
from .base import (
    BackendPlugin,
    Blank,
    Capacity,
    ClassParameters,
    CreateRequest,
    DiskBackend,
    DiskLocation,
    DiskRef,
    DiskState,
    FromDisk,
    FromImage,
    Readable,
)
from .copysnap import SnapshotMissing
from .lvm_activation import Activation, DeviceMapperActivation
from .lvm_names import crypt_mapping, disk_lv, snapshot_lv

log = logging.getLogger(__name__)

OWNER = "vmdisk"
DISK = "vmdisk.disk"  # vmdisk.disk=<namespace>/<name>
SNAPSHOT = "vmdisk.snapshot"  # vmdisk.snapshot=<name>, on snapshot LVs
PARTIAL = "vmdisk.partial"
LUKS2 = "vmdisk.luks2"
FILESYSTEM = "vmdisk.fs"
BASE = "vmdisk.base"
RESTORED = "vmdisk.restored"
MERGING = "vmdisk.merging"  # vmdisk.merging=<snapshot>: a rollback between merge and re-take
DEFAULT_THIN_POOL = "vmdisk-thinpool"


class ThinPoolMissing(PermanentError):
    reason = "ThinPoolMissing"


class LvmParameters(ClassParameters):
    """``spec.parameters`` of an lvm class."""

    volume_group: str | None = Field(
        default=None,
        pattern=LVM_NAME_PATTERN,
        description="lvm: a volume group the node's VMDISK_LVM_VG allows; default: its first.",
    )
    thin: bool = Field(default=False, description="lvm: thin volumes in the thin pool.")
    thin_pool: str = Field(
        default=DEFAULT_THIN_POOL, pattern=LVM_NAME_PATTERN, description="lvm: the thin pool's LV."
    )

    def resolve(self, settings: Settings) -> Self:
        allowed = settings.lvm_vgs
        vg = self.volume_group or (allowed[0] if allowed else None)
        if vg is None or vg not in allowed:
            raise ClassNotAllowed(
                f"spec.parameters.volumeGroup: {vg or '(none)'!r} is not a volume group this "
                f"node allows (VMDISK_LVM_VG: {', '.join(allowed) or 'unset'})"
            )
        return self.model_copy(update={"volume_group": vg})

    @property
    def placement(self) -> str | None:
        return self.volume_group


def _params(ref: DiskRef) -> LvmParameters:
    return ref.parameters if isinstance(ref.parameters, LvmParameters) else LvmParameters()


class LvmBackend:
    name: ClassVar[str] = "lvm"
    shared: ClassVar[bool] = False
    preallocations: ClassVar[frozenset[str]] = frozenset({"none", "full"})

    def __init__(
        self,
        volume_group: str,
        *others: str,
        lvm: Lvm | None = None,
        crypt: Crypt | None = None,
        activation: Activation | None = None,
    ) -> None:
        """``volume_group`` (the default) and ``others``: the only VGs this backend touches."""
        self.volume_groups = tuple(
            check_lvm_name("volume group", vg) for vg in (volume_group, *others)
        )
        self.lvm = lvm or Lvm()
        self.crypt = crypt or Crypt()
        self.activation = activation or DeviceMapperActivation(self.lvm)

    @property
    def volume_group(self) -> str:
        return self.volume_groups[0]

    # -- names ---------------------------------------------------------------
    def _vg(self, ref: DiskRef) -> str:
        # The engine resolved the class against the same settings; refusing
        # here too keeps a wrong reference from ever reaching lvm.
        vg = ref.placement or self.volume_group
        if vg not in self.volume_groups:
            raise ClassNotAllowed(
                f"disk {ref}: volume group {vg!r} is not one this node allows "
                f"({', '.join(self.volume_groups)})"
            )
        return vg

    def _lv(self, ref: DiskRef) -> tuple[str, str]:
        vg = self._vg(ref)
        return vg, disk_lv(vg, ref.namespace, ref.name)

    def _mapping(self, ref: DiskRef) -> str:
        return crypt_mapping(*self._lv(ref))

    def location(self, ref: DiskRef) -> DiskLocation:
        vg, lv = self._lv(ref)
        path = self.crypt.path(self._mapping(ref)) if ref.encrypted else Path("/dev") / vg / lv
        return DiskLocation(type="block", path=str(path), format="raw")

    # -- state ---------------------------------------------------------------
    def _volume(self, ref: DiskRef) -> LogicalVolume | None:
        """The disk's complete LV, checked against the spec's encryption."""
        volume = self.lvm.volume(*self._lv(ref))
        if volume is None or PARTIAL in volume.tags:
            return None
        if (LUKS2 in volume.tags) != ref.encrypted:
            raise InvalidSpec(
                "encryption cannot be added to or removed from an existing disk "
                f"(the LV of {ref} is {'' if LUKS2 in volume.tags else 'not '}encrypted)"
            )
        return volume

    def state(self, ref: DiskRef) -> DiskState | None:
        volume = self._volume(ref)
        if volume is None:
            return None
        header = HEADER_BYTES if LUKS2 in volume.tags else 0
        actual = volume.size
        if volume.segtype == "thin" and volume.data_percent is not None:
            actual = int(volume.size * volume.data_percent / 100)
        return DiskState(
            format="raw",
            virtual_size=volume.size - header,
            actual_size=actual,
            base_image=volume.tag_value(BASE),
            restored_snapshot=volume.tag_value(RESTORED),
        )

    def inventory(self) -> list[DiskRef]:
        refs = []
        for vg in self.volume_groups:
            for volume in self.lvm.volumes(vg, tag=OWNER):
                disk = volume.tag_value(DISK)
                if disk and volume.tag_value(SNAPSHOT) is None and PARTIAL not in volume.tags:
                    namespace, name = disk.split("/", 1)
                    refs.append(DiskRef(namespace, name, vg, LUKS2 in volume.tags))
        return refs

    def capacity(self) -> Capacity:
        group = self.lvm.volume_group(self.volume_group)
        pool = self.lvm.volume(self.volume_group, DEFAULT_THIN_POOL)
        pool_free = None
        if pool is not None and pool.data_percent is not None:
            pool_free = int(pool.size * (100 - pool.data_percent) / 100)
        return Capacity(self.volume_group, group.size, group.free, pool_free)

    # -- lifecycle -----------------------------------------------------------
    def create(self, ref: DiskRef, request: CreateRequest) -> DiskState:
        self._check(ref, request)
        vg, lv = self._lv(ref)
        leftover = self.lvm.volume(vg, lv)
        if leftover is not None and PARTIAL in leftover.tags:
            self._discard(ref)  # a crashed attempt
        elif leftover is not None:
            state = self.state(ref)
            assert state is not None
            return state
        key = request.encryption_key
        tags = [OWNER, f"{DISK}={ref.namespace}/{ref.name}", PARTIAL]
        content = request.content
        if key is not None:
            tags.append(LUKS2)
        if isinstance(content, Blank) and content.filesystem:
            tags.append(f"{FILESYSTEM}={content.filesystem}")
        if isinstance(content, FromImage):
            tags.append(f"{BASE}={content.image.id}")
        elif isinstance(content, FromDisk) and content.base is not None:
            tags.append(f"{BASE}={content.base.id}")
        params = _params(ref)
        pool = params.thin_pool if params.thin else None
        size = request.size + (HEADER_BYTES if key is not None else 0)
        self.lvm.create(vg, lv, size, tags=tags, thin_pool=pool)
        with self._remove_on_error(ref):
            device = self.activation.open(vg, lv)
            if key is not None:
                self.crypt.format(device, key)
                device = self.crypt.open(device, self._mapping(ref), key)
            self._populate(device, request, thin=params.thin, encrypted=key is not None)
            self.lvm.tag(vg, lv, remove=[PARTIAL])
        state = self.state(ref)
        assert state is not None
        return state

    def _check(self, ref: DiskRef, request: CreateRequest) -> None:
        if request.preallocation not in self.preallocations:
            raise InvalidSpec(
                f"spec.preallocation: {request.preallocation!r} is not supported by the lvm "
                "backend (thick volumes are always fully allocated; use none or full)"
            )
        params = _params(ref)
        if params.thin and request.preallocation == "full":
            raise InvalidSpec(
                "spec.preallocation: full contradicts the class's thin volumes (parameters.thin)"
            )
        if not isinstance(request.content, Blank | FromImage | FromDisk):
            raise UnsupportedOperation(
                "spec.source.image.url: rbd:// images can only back rbd disks, not lvm ones",
                reason="SourceNotSupported",
            )
        if ref.encrypted != (request.encryption_key is not None):
            raise InvalidSpec(f"disk {ref}: its class encrypts but no key was given")
        if not params.thin:
            return
        vg = self._vg(ref)
        pool = self.lvm.volume(vg, params.thin_pool)
        if pool is None:
            raise ThinPoolMissing(
                f"the class's volume group {vg} has no thin pool {params.thin_pool!r}; an "
                f"administrator creates it once (lvcreate --type thin-pool -l 50%FREE -n "
                f"{params.thin_pool} {vg}), or uses a class with thin: false"
            )
        if not pool.zero and not ref.encrypted:
            raise ThinPoolUnsafe(
                f"the class's thin pool {vg}/{params.thin_pool} does not zero new blocks "
                "(made with -Zn), so a disk could read a deleted disk's data; an administrator "
                f"turns zeroing on with lvchange -Zy {vg}/{params.thin_pool}"
            )

    def _populate(
        self, device: Path, request: CreateRequest, *, thin: bool, encrypted: bool
    ) -> None:
        """Write the disk's content; zero what may hold old data (see the module docstring)."""
        zero_rest = not thin and not encrypted
        content = request.content
        if isinstance(content, Blank):
            if zero_rest:
                blockdev.zero(device)
            if content.filesystem:
                make_filesystem(device, content.filesystem)
            return
        assert isinstance(content, FromImage | FromDisk)
        source = content.source
        if isinstance(content, FromImage):
            written = content.image.virtual_size
        else:
            written = qemu_img.info(source.path, source.format).virtual_size
        if zero_rest and written < request.size:
            blockdev.zero(device, written)  # the tail the copy will not write
        # -n: the target exists, and qemu-img then writes the image's zeroes
        # too, except into a fresh thin volume, which already reads as zeroes.
        qemu_img.convert(
            source.path,
            source.format,
            device,
            "raw",
            snapshot=source.snapshot,
            target_exists=True,
            target_is_zero=thin and not encrypted,
            progress=request.progress,
        )

    @contextmanager
    def _remove_on_error(self, ref: DiskRef) -> Iterator[None]:
        try:
            yield
        except BaseException:
            try:
                self._discard(ref)
            except Exception:  # keep the original error; the next create retries
                log.exception("%s: could not remove the half-made volume", ref)
            raise

    def _discard(self, ref: DiskRef) -> None:
        """Remove the disk's mapping and LV, whatever state they are in."""
        vg, lv = self._lv(ref)
        self.crypt.close(self._mapping(ref))
        if self.lvm.volume(vg, lv) is not None:
            self.activation.close(vg, lv)
            self.lvm.remove(vg, lv)

    def resize(self, ref: DiskRef, size: int) -> DiskState:
        volume, device = self._extend(ref, size)
        filesystem = volume.tag_value(FILESYSTEM)
        if filesystem and (not ref.encrypted or self.crypt.is_open(self._mapping(ref))):
            blockdev.grow_filesystem(device, filesystem)
        state = self.state(ref)
        assert state is not None
        return state

    def prepare_online_grow(self, ref: DiskRef, size: int) -> None:
        """Extend the LV (and its LUKS2 mapping); the guest grows its own filesystem.

        A thick LV with snapshots waits: lvm2 resizes a snapshot origin only
        while it is inactive, which a running VM's disk cannot be.
        """
        volume = self._volume(ref)
        if volume is not None and volume.thick_origin:
            raise DiskInUse(
                f"disk {ref} has thick snapshots, and lvm2 grows such a volume only while it "
                "is inactive; the grow waits until the VM releases it (or the snapshots go)"
            )
        self._extend(ref, size)

    def holders(self, ref: DiskRef) -> list[str]:
        path = Path(self.location(ref).path)
        if qemu_lock_held(path):
            return [f"a process holding QEMU's image lock on {path}"]
        return []

    def _extend(self, ref: DiskRef, size: int) -> tuple[LogicalVolume, Path]:
        """Grow the LV to hold ``size`` bytes; the volume and the device to use."""
        vg, lv = self._lv(ref)
        volume = self._volume(ref)
        if volume is None:
            raise DiskMissing(f"disk {ref} has no volume in volume group {vg}")
        header = HEADER_BYTES if ref.encrypted else 0
        old_size = volume.size - header
        if old_size < size:
            self.lvm.extend(vg, volume, size + header)
        device = self.activation.open(vg, lv)
        if old_size < size and volume.segtype != "thin" and not ref.encrypted:
            # New extents may hold a deleted disk's data (thin ones read as
            # zeroes, encrypted ones as noise).
            blockdev.zero(device, old_size)
        mapping = self._mapping(ref)
        if ref.encrypted and self.crypt.is_open(mapping):
            self.crypt.resize(mapping)
            device = self.crypt.path(mapping)
        return volume, device

    def readable(self, ref: DiskRef, snapshot: str | None = None) -> Readable:
        vg, lv = self._lv(ref)
        if snapshot is None:
            if ref.encrypted:
                return Readable(self.crypt.path(self._mapping(ref)), "raw")
            return Readable(self.activation.open(vg, lv), "raw")
        if ref.encrypted:
            raise UnsupportedOperation(
                f"snapshot {snapshot!r} of encrypted disk {ref} cannot be exported or cloned "
                "(it would need its own key mapping)"
            )
        name = self._snapshot(ref, snapshot)
        return Readable(self.activation.open(vg, name), "raw")

    def delete(self, ref: DiskRef) -> None:
        for snapshot in self.snapshots(ref):
            self.remove_snapshot(ref, snapshot, ignore_missing=True)
        self._discard(ref)

    def unlock(self, ref: DiskRef, key: bytes) -> None:
        vg, lv = self._lv(ref)
        if self._volume(ref) is None:
            return
        device = self.activation.open(vg, lv)
        self.crypt.open(device, self._mapping(ref), key)

    # -- snapshots -----------------------------------------------------------
    def _snapshot(self, ref: DiskRef, name: str) -> str:
        vg, _ = self._lv(ref)
        snap = snapshot_lv(vg, ref.namespace, ref.name, name)
        if self.lvm.volume(vg, snap) is None:
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")
        return snap

    def snapshots(self, ref: DiskRef) -> tuple[str, ...]:
        vg, _ = self._lv(ref)
        wanted = f"{ref.namespace}/{ref.name}"
        return tuple(
            sorted(
                snap
                for v in self.lvm.volumes(vg, tag=OWNER)
                if v.tag_value(DISK) == wanted and (snap := v.tag_value(SNAPSHOT)) is not None
            )
        )

    def create_snapshot(self, ref: DiskRef, name: str) -> int:
        vg, _ = self._lv(ref)
        origin = self._volume(ref)
        if origin is None:
            raise SnapshotMissing(f"disk {ref} does not exist")
        snap = snapshot_lv(vg, ref.namespace, ref.name, name)
        if self.lvm.volume(vg, snap) is None:
            self._take_snapshot(ref, origin, name)
        return origin.size - (HEADER_BYTES if ref.encrypted else 0)

    def _take_snapshot(self, ref: DiskRef, origin: LogicalVolume, name: str) -> None:
        vg = self._vg(ref)
        snap = snapshot_lv(vg, ref.namespace, ref.name, name)
        tags = [OWNER, f"{DISK}={ref.namespace}/{ref.name}", f"{SNAPSHOT}={name}"]
        self.lvm.snapshot(vg, origin, snap, tags=tags)

    def remove_snapshot(self, ref: DiskRef, name: str, *, ignore_missing: bool = False) -> None:
        vg, _ = self._lv(ref)
        snap = snapshot_lv(vg, ref.namespace, ref.name, name)
        if self.lvm.volume(vg, snap) is None:
            if ignore_missing:
                return
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")
        # Not deactivated first: a thick snapshot cannot go down without its
        # origin, the disk (see Lvm.deactivate); lvremove leaves the origin be.
        self.lvm.remove(vg, snap)

    def rollback(self, ref: DiskRef, name: str) -> DiskState:
        """Merge the snapshot into the disk, then take it again under the same name.

        A merge consumes the snapshot; re-taking it right away keeps the
        DiskSnapshot usable, with the same content.  The origin carries a
        ``vmdisk.merging`` tag from before the merge until the snapshot is
        back, so a rollback cut off in between (a crash) is finished by the
        next one rather than failing with the snapshot gone.  The disk must
        not be in use: an encrypted disk's mapping is closed here and
        reopened by the engine's next ``unlock``.
        """
        vg, lv = self._lv(ref)
        origin = self._volume(ref)
        if origin is None:
            raise SnapshotMissing(f"disk {ref} does not exist")
        merging = origin.tag_value(MERGING)
        snap = snapshot_lv(vg, ref.namespace, ref.name, name)
        if self.lvm.volume(vg, snap) is not None or merging != name:
            self._snapshot(ref, name)  # SnapshotMissing unless it is there
            self.lvm.tag(vg, lv, remove=_tag(MERGING, merging), add=_tag(MERGING, name))
            self.crypt.close(self._mapping(ref))
            self.activation.open(vg, lv)  # active and not open: a thick merge runs now
            self.lvm.merge(vg, snap)
            if origin.segtype == "thin":
                # A thin merge into an active origin waits for its next activation.
                self.activation.close(vg, lv)
                self.activation.open(vg, lv)
        else:
            log.warning(
                "%s: finishing the rollback to %r a crash cut off after its merge", ref, name
            )
        self._take_snapshot(ref, origin, name)
        previous = origin.tag_value(RESTORED)
        self.lvm.tag(
            vg, lv, remove=[*_tag(RESTORED, previous), *_tag(MERGING, name)],
            add=_tag(RESTORED, name),
        )  # fmt: skip
        state = self.state(ref)
        assert state is not None
        return state


def _tag(prefix: str, value: str | None) -> list[str]:
    """``[<prefix>=<value>]``, or nothing when there is no value."""
    return [f"{prefix}={value}"] if value else []


def _build(settings: Settings, layout: StateLayout) -> DiskBackend | None:
    return LvmBackend(*settings.lvm_vgs) if settings.lvm_vgs else None


PLUGIN = BackendPlugin("lvm", LvmParameters, _build)
