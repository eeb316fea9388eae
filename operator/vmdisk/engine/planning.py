"""Pure planning: from a spec and what exists on the host to the actions to take.

No I/O here, so the rules can be tested (and fuzzed) exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.vmdisk import VMDisk, VMDiskSpec, VMDiskStatus
from ..backends.base import ClusterAccess, DiskRef, DiskState
from ..config import Settings
from ..errors import DiskMissing, ImmutableField, ShrinkNotSupported


@dataclass(frozen=True)
class Create:
    pass


@dataclass(frozen=True)
class Resize:
    size: int


@dataclass(frozen=True)
class Restore:
    snapshot: str


Action = Create | Resize | Restore


def backend_for(spec: VMDiskSpec, status: VMDiskStatus | None, default: str) -> str:
    """The backend of a disk: pinned in status once created, never switched.

    A changed node default does not move existing disks; only an explicit
    different ``spec.backend`` is an error.
    """
    pinned = status.backend if status is not None and status.format is not None else None
    if pinned is not None and spec.backend is not None and pinned != spec.backend:
        raise ImmutableField(
            f"spec.backend: cannot change from {pinned!r} to {spec.backend!r} after creation"
        )
    return pinned or spec.backend or default


def plan_disk(
    spec: VMDiskSpec, status: VMDiskStatus | None, host: DiskState | None
) -> list[Action]:
    """Actions that bring the host to ``spec``; empty when nothing is to be done."""
    if host is None:
        if status is not None and status.format is not None:
            # We made it once (the format was pinned) and it is gone: never
            # silently recreate a disk whose data a VM may have depended on.
            raise DiskMissing(
                f"the disk's data at {status.path} no longer exists; delete and recreate "
                "the VMDisk to provision it again"
            )
        return [Create()]
    actions: list[Action] = []
    current = host.virtual_size
    if spec.restore is not None and spec.restore.snapshot != host.restored_snapshot:
        actions.append(Restore(spec.restore.snapshot))
    wanted = spec.size_bytes
    if wanted is not None:
        if wanted < current:
            raise ShrinkNotSupported(
                f"spec.size: {spec.size} ({wanted} bytes) is smaller than the disk's "
                f"{current} bytes; disks only grow"
            )
        if wanted > current or actions:
            # After a restore the disk may be back at the snapshot's size.
            actions.append(Resize(wanted))
    return actions


def backend_name(disk: VMDisk, default: str) -> str:
    """The disk's backend without judging a change: pinned once created, else spec or default."""
    status = disk.status
    if status is not None and status.format is not None and status.backend is not None:
        return status.backend
    return disk.spec.backend or default


def disk_ref(disk: VMDisk, settings: Settings) -> DiskRef:
    """The backend reference of a VMDisk, with its pool or volume group and cluster access."""
    spec = disk.spec
    backend = backend_name(disk, settings.default_backend)
    placement = None
    if backend == "rbd":
        placement = (spec.rbd.pool if spec.rbd else None) or settings.rbd_pool
    elif backend == "lvm":
        placement = (spec.lvm.volume_group if spec.lvm else None) or settings.lvm_vg
    access = None
    if backend == "rbd" and spec.rbd is not None:
        access = ClusterAccess(spec.rbd.ceph_conf, spec.rbd.user, spec.rbd.secret_uuid)
    return DiskRef(
        disk.metadata.namespace, disk.metadata.name, placement, spec.encryption is not None, access
    )
