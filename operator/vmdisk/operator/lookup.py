"""The engine's Lookup over kopf's in-memory indexes (no API calls per lookup)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk
from ..api.vmdiskclass import VMDiskClass

log = logging.getLogger(__name__)
Key = tuple[str, str]
M = TypeVar("M", VMDisk, DiskSnapshot, VMDiskClass)


def _parse(model: type[M], raw: Any) -> M | None:
    try:
        return model.model_validate(dict(raw))
    except ValidationError:
        return None  # its own handler reports the invalid spec


def _first(model: type[M], store: Iterable[Any] | None) -> M | None:
    for raw in store or ():
        return _parse(model, raw)
    return None


class IndexLookup:
    """Reads VMDisks and DiskSnapshots from kopf indexes keyed by (namespace, name),
    and VMDiskClasses from one keyed by name."""

    def __init__(
        self,
        disks: Mapping[Key, Iterable[Any]],
        snapshots: Mapping[Key, Iterable[Any]],
        classes: Mapping[str, Iterable[Any]] | None = None,
    ) -> None:
        self.disks = disks
        self.snapshots = snapshots
        self.classes = classes or {}

    def get_class(self, name: str) -> VMDiskClass | None:
        return _first(VMDiskClass, self.classes.get(name))

    def list_classes(self) -> list[VMDiskClass]:
        found = (_first(VMDiskClass, s) for s in self.classes.values())
        return [c for c in found if c is not None]

    def get_disk(self, namespace: str, name: str) -> VMDisk | None:
        return _first(VMDisk, self.disks.get((namespace, name)))

    def get_snapshot(self, namespace: str, name: str) -> DiskSnapshot | None:
        return _first(DiskSnapshot, self.snapshots.get((namespace, name)))

    def list_disks(self, namespace: str) -> list[VMDisk]:
        found = (_first(VMDisk, s) for (ns, _), s in self.disks.items() if ns == namespace)
        return [d for d in found if d is not None]

    def list_snapshots(self, namespace: str) -> list[DiskSnapshot]:
        found = (
            _first(DiskSnapshot, s) for (ns, _), s in self.snapshots.items() if ns == namespace
        )
        return [s for s in found if s is not None]
