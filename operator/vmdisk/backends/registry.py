"""Maps ``spec.backend`` to a backend instance, each with its settings injected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UnsupportedOperation
from ..layout import StateLayout
from .base import DiskBackend
from .lvm import LvmBackend
from .ploop import PloopBackend
from .qcow2 import Qcow2Backend
from .raw import RawBackend
from .rbd_config import RbdSettings


@dataclass(frozen=True)
class Registry:
    backends: Mapping[str, DiskBackend]

    def get(self, name: str) -> DiskBackend:
        try:
            return self.backends[name]
        except KeyError:
            available = ", ".join(sorted(self.backends))
            raise UnsupportedOperation(
                f"spec.backend: {name!r} is not available on this node (available: {available})",
                reason="BackendUnavailable",
            ) from None


def default_registry(
    layout: StateLayout, *, lvm_vg: str | None = None, rbd: RbdSettings | None = None
) -> Registry:
    """The backends every node has (the file-based ones), plus lvm when a VG is configured
    and rbd when the node is configured for Ceph (a default pool or a ceph.conf)."""
    backends: list[DiskBackend] = [RawBackend(layout), Qcow2Backend(layout), PloopBackend(layout)]
    if lvm_vg:
        backends.append(LvmBackend(lvm_vg))
    if rbd is not None and (rbd.pool or rbd.ceph_conf):
        from .rbd import RbdBackend  # imports librados: only on Ceph nodes

        backends.append(RbdBackend(rbd, layout))
    return Registry({b.name: b for b in backends})
