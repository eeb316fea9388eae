"""The engine's Lookup over kopf's in-memory indexes (no API calls per lookup)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk
from ..api.vmdiskclass import VMDiskClass
from ..engine.ports import SourceKind

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

    def snapshots_of(self, namespace: str, disk: str) -> list[DiskSnapshot]:
        # A copy of the items first: kopf's event loop changes the index meanwhile.
        found = (
            _first(DiskSnapshot, s)
            for (ns, _), s in list(self.snapshots.items())
            if ns == namespace and any(_spec(raw).get("diskName") == disk for raw in s)
        )
        return [s for s in found if s is not None]

    def disks_from(self, namespace: str, kind: SourceKind, name: str) -> list[VMDisk]:
        # Only the bodies that name the source are parsed (parsing is the cost).
        found = (
            _first(VMDisk, s)
            for (ns, _), s in list(self.disks.items())
            if ns == namespace and any(_source_name(raw, kind) == name for raw in s)
        )
        return [d for d in found if d is not None]


def _spec(raw: Any) -> Mapping[str, Any]:
    spec = raw.get("spec") if isinstance(raw, Mapping) else None
    return spec if isinstance(spec, Mapping) else {}


def _source_name(raw: Any, kind: str) -> object:
    source = _spec(raw).get("source")
    ref = source.get(kind) if isinstance(source, Mapping) else None
    return ref.get("name") if isinstance(ref, Mapping) else None
