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


def default_registry(layout: StateLayout, *, lvm_vg: str | None = None) -> Registry:
    """The backends every node has (the file-based ones), plus lvm when a VG is configured."""
    backends: list[DiskBackend] = [RawBackend(layout), Qcow2Backend(layout), PloopBackend(layout)]
    if lvm_vg:
        backends.append(LvmBackend(lvm_vg))
    return Registry({b.name: b for b in backends})
