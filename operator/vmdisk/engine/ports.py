"""What the engine needs from its surroundings, as Protocols.

Local mode and the operator each provide their own: the file store or kopf's
indexes for Lookup, files or the Kubernetes API for Secrets, metrics or
nothing for the Observer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk, VMDiskStatus
from ..api.vmdiskclass import VMDiskClass
from ..images.entries import CacheObserver

Publish = Callable[[VMDiskStatus], None]
SourceKind = Literal["disk", "snapshot"]


class Lookup(Protocol):
    """Read access to the other resources a disk or snapshot depends on."""

    def get_disk(self, namespace: str, name: str) -> VMDisk | None: ...

    def get_snapshot(self, namespace: str, name: str) -> DiskSnapshot | None: ...

    def snapshots_of(self, namespace: str, disk: str) -> list[DiskSnapshot]:
        """The DiskSnapshots whose ``spec.diskName`` is ``disk``.

        A query, not a scan: deleting N disks must not read N objects each.
        """
        ...

    def disks_from(self, namespace: str, kind: SourceKind, name: str) -> list[VMDisk]:
        """The VMDisks made from one source: ``spec.source.<kind>.name`` is ``name``."""
        ...

    def get_class(self, name: str) -> VMDiskClass | None: ...

    def list_classes(self) -> list[VMDiskClass]: ...


class Secrets(Protocol):
    """Reads one key of a Secret: files in local mode, the Kubernetes API in the operator.

    The engine only asks for keys named by classes, in the agent's own namespace.
    """

    def get(self, namespace: str, name: str, key: str) -> bytes: ...


class Observer(CacheObserver, Protocol):
    """Told what the engine did (the operator's metrics); the default ignores it."""

    def disk_reconciled(self, backend: str, status: VMDiskStatus, seconds: float) -> None: ...


class _NoObserver:
    def disk_reconciled(self, backend: str, status: VMDiskStatus, seconds: float) -> None:
        pass

    def cache_lookup(self, hit: bool) -> None:
        pass

    def image_fetched(self, scheme: str, size: int, seconds: float) -> None:
        pass


NO_OBSERVER: Observer = _NoObserver()
