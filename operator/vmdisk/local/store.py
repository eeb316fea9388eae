"""The file-backed object store of local mode (``vmdisk apply`` with no cluster).

Objects live as JSON under ``<state>/objects/<plural>/<namespace>/<name>.json``
and behave like the API server's: ``metadata.generation`` grows when the spec
changes, status is written separately.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import ValidationError

from ..api.common import dump, now_rfc3339
from ..api.snapshot import DiskSnapshot, DiskSnapshotStatus
from ..api.vmdisk import VMDisk, VMDiskStatus
from ..api.vmdiskclass import VMDiskClass
from ..host.files import atomic_write, remove_path
from ..host.locks import file_lock
from ..layout import StateLayout

Plural = Literal["vmdisks", "disksnapshots", "vmdiskclasses"]
Resource = VMDisk | DiskSnapshot
Stored = VMDisk | DiskSnapshot | VMDiskClass
PLURALS: dict[str, Plural] = {
    "VMDisk": "vmdisks",
    "DiskSnapshot": "disksnapshots",
    "VMDiskClass": "vmdiskclasses",
}
# Cluster-scoped objects live under a directory no namespace can be called.
CLUSTER_SCOPE = "_cluster"


def scope(obj: Stored) -> str:
    """The object's namespace directory: its namespace, or CLUSTER_SCOPE."""
    return CLUSTER_SCOPE if isinstance(obj, VMDiskClass) else obj.metadata.namespace


class CorruptObject(Exception):
    pass


class LocalStore:
    """Implements the engine's Lookup over files in the state directory."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout

    def _read(self, plural: Plural, namespace: str, name: str) -> dict[str, Any] | None:
        path = self.layout.object_file(plural, namespace, name)
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise CorruptObject(f"{path}: {exc}") from exc
        return data

    def _parse(self, data: dict[str, Any]) -> Stored:
        try:
            if data.get("kind") == "DiskSnapshot":
                return DiskSnapshot.model_validate(data)
            if data.get("kind") == "VMDiskClass":
                return VMDiskClass.model_validate(data)
            return VMDisk.model_validate(data)
        except ValidationError as exc:
            raise CorruptObject(str(exc)) from exc

    def get(self, plural: Plural, namespace: str, name: str) -> Stored | None:
        data = self._read(plural, namespace, name)
        return None if data is None else self._parse(data)

    def get_disk(self, namespace: str, name: str) -> VMDisk | None:
        obj = self.get("vmdisks", namespace, name)
        return obj if isinstance(obj, VMDisk) else None

    def get_snapshot(self, namespace: str, name: str) -> DiskSnapshot | None:
        obj = self.get("disksnapshots", namespace, name)
        return obj if isinstance(obj, DiskSnapshot) else None

    def get_class(self, name: str) -> VMDiskClass | None:
        obj = self.get("vmdiskclasses", CLUSTER_SCOPE, name)
        return obj if isinstance(obj, VMDiskClass) else None

    def list_classes(self) -> list[VMDiskClass]:
        found = self.list_objects("vmdiskclasses", CLUSTER_SCOPE)
        return [o for o in found if isinstance(o, VMDiskClass)]

    def list_objects(self, plural: Plural, namespace: str | None = None) -> list[Stored]:
        root = self.layout.objects_dir(plural)
        pattern = f"{namespace}/*.json" if namespace else "*/*.json"
        return [self._parse(json.loads(p.read_text())) for p in sorted(root.glob(pattern))]

    def list_disks(self, namespace: str) -> list[VMDisk]:
        return [o for o in self.list_objects("vmdisks", namespace) if isinstance(o, VMDisk)]

    def list_disks_everywhere(self) -> list[VMDisk]:
        return [o for o in self.list_objects("vmdisks") if isinstance(o, VMDisk)]

    def list_snapshots(self, namespace: str) -> list[DiskSnapshot]:
        return [
            o for o in self.list_objects("disksnapshots", namespace) if isinstance(o, DiskSnapshot)
        ]

    def apply(self, obj: Stored) -> Stored:
        """Create or update from a manifest; generation grows only when the spec changes."""
        plural = PLURALS[obj.kind]
        namespace, name = scope(obj), obj.metadata.name
        with file_lock(self.layout.lock("object", plural, namespace, name)):
            old = self._read(plural, namespace, name)
            new = dump(obj)
            new.pop("status", None)
            if old is None:
                new["metadata"].update(
                    uid=str(uuid.uuid4()), generation=1, creationTimestamp=now_rfc3339()
                )
            else:
                kept = {k: old["metadata"][k] for k in ("uid", "creationTimestamp", "generation")}
                new["metadata"].update(kept)
                if old.get("spec") != new["spec"]:
                    new["metadata"]["generation"] = kept["generation"] + 1
                if "status" in old:
                    new["status"] = old["status"]
            parsed = self._parse(new)
            self._write(plural, parsed)
            return parsed

    def save_status(self, obj: Resource, status: VMDiskStatus | DiskSnapshotStatus) -> Resource:
        """Write ``status`` onto the stored object (which must still exist)."""
        plural = PLURALS[obj.kind]
        meta = obj.metadata
        with file_lock(self.layout.lock("object", plural, meta.namespace, meta.name)):
            data = self._read(plural, meta.namespace, meta.name)
            if data is None:
                return obj
            data["status"] = dump(status)
            updated = self._parse(data)
            assert not isinstance(updated, VMDiskClass)
            self._write(plural, updated)
            return updated

    def remove(self, obj: Stored) -> None:
        remove_path(self.layout.object_file(PLURALS[obj.kind], scope(obj), obj.metadata.name))

    def _write(self, plural: Plural, obj: Stored) -> None:
        path = self.layout.object_file(plural, scope(obj), obj.metadata.name)
        # Specs may carry credentials (image URLs): root only.
        atomic_write(path, json.dumps(dump(obj), indent=1, sort_keys=True) + "\n", mode=0o600)
