"""Pure planning: from a spec and what exists on the host to the actions to take.

No I/O here, so the rules can be tested (and fuzzed) exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.vmdisk import VMDiskSpec, VMDiskStatus
from ..backends.base import DiskState
from ..errors import DiskMissing, ShrinkNotSupported


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
