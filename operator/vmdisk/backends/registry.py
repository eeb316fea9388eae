"""The backends, as one list of plugins, and the ones this node runs.

Adding a backend is its module (declaring a ``PLUGIN``), its host module, and
one line in ``PLUGINS``; the CRDs regenerate from the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import Settings
from ..errors import UnsupportedOperation
from ..layout import StateLayout
from . import lvm, ploop, qcow2, raw, rbd_config
from .base import BackendPlugin, DiskBackend

PLUGINS: tuple[BackendPlugin, ...] = (
    raw.PLUGIN,
    qcow2.PLUGIN,
    ploop.PLUGIN,
    lvm.PLUGIN,
    rbd_config.PLUGIN,
)
PLUGINS_BY_NAME: Mapping[str, BackendPlugin] = {p.name: p for p in PLUGINS}


@dataclass(frozen=True)
class Registry:
    """The backends running on this node, by name, and every backend's plugin."""

    backends: Mapping[str, DiskBackend]
    plugins: Mapping[str, BackendPlugin] = field(default_factory=lambda: PLUGINS_BY_NAME)

    def get(self, name: str) -> DiskBackend:
        try:
            return self.backends[name]
        except KeyError:
            available = ", ".join(sorted(self.backends))
            raise UnsupportedOperation(
                f"spec.backend: {name!r} is not available on this node (available: {available})",
                reason="BackendUnavailable",
            ) from None

    def plugin(self, name: str) -> BackendPlugin:
        try:
            return self.plugins[name]
        except KeyError:
            raise UnsupportedOperation(
                f"backend {name!r} does not exist (known: {', '.join(sorted(self.plugins))})",
                reason="BackendUnavailable",
            ) from None


def default_registry(settings: Settings, layout: StateLayout) -> Registry:
    """Every backend the node's settings configure (the file backends always)."""
    built = ((p.name, p.build(settings, layout)) for p in PLUGINS)
    return Registry({name: backend for name, backend in built if backend is not None})
