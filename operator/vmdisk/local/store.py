"""The file-backed object store of local mode (``vmdisk apply`` with no cluster).

Objects live as JSON under ``<state>/objects/<plural>/<namespace>/<name>.json``
and behave like the API server's: ``metadata.generation`` grows when the spec
changes, status is written separately.  Writing what is already stored is
skipped (no fsync, no rename), so a no-op reconcile only reads.  Beside a
disk's status the file may keep the fingerprint of what that status was
reconciled against (``settled``) and the manifest document last applied
(``objectfiles``), so that a re-apply can skip the engine, or the models too.

Dependents (snapshots of a disk, disks made from a disk or snapshot) are
answered from an index of each namespace, built from one read of its objects
and kept while the namespace's directories are unchanged except by this
store: deleting N disks reads the objects once, not N times.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..api.common import dump, now_rfc3339
from ..api.snapshot import DiskSnapshot, DiskSnapshotStatus
from ..api.vmdisk import VMDisk, VMDiskStatus
from ..api.vmdiskclass import VMDiskClass
from ..engine.ports import SourceKind
from ..host.files import atomic_write, fsync_dir, remove_path, remove_stale_temps
from ..host.locks import file_lock
from ..layout import CLUSTER_SCOPE, StateLayout
from .objectfiles import (
    APPLIED,
    FINGERPRINT,
    CorruptObject,
    Plural,
    applied_stamp,
    class_version,
    read_object,
    without_host_keys,
)

Resource = VMDisk | DiskSnapshot
Stored = VMDisk | DiskSnapshot | VMDiskClass
PLURALS: dict[str, Plural] = {
    "VMDisk": "vmdisks",
    "DiskSnapshot": "disksnapshots",
    "VMDiskClass": "vmdiskclasses",
}


def scope(obj: Stored) -> str:
    """The object's namespace directory: its namespace, or CLUSTER_SCOPE."""
    return CLUSTER_SCOPE if isinstance(obj, VMDiskClass) else obj.metadata.namespace


Recorded = tuple[Stored, str | None]  # an object and the fingerprint stored beside it


@dataclass(frozen=True)
class Applied:
    """What ``put`` stored, and whether it was stored already (with its fingerprint)."""

    obj: Stored
    unchanged: bool
    fingerprint: str | None


RefKey = tuple[str, str]  # ("diskName" | "disk" | "snapshot", the name referred to)
Owner = tuple[Plural, str]  # (plural, name) of the referring object
_REF_PLURALS: tuple[Plural, Plural] = ("vmdisks", "disksnapshots")


def _refs_of(data: dict[str, Any]) -> list[RefKey]:
    """What a stored object (raw JSON, camelCase) refers to; no validation needed."""
    spec = data.get("spec")
    if not isinstance(spec, dict):
        return []
    if data.get("kind") == "DiskSnapshot":
        name = spec.get("diskName")
        return [("diskName", name)] if isinstance(name, str) else []
    source = spec.get("source")
    found: list[RefKey] = []
    for kind in ("disk", "snapshot"):
        ref = source.get(kind) if isinstance(source, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            found.append((kind, ref["name"]))
    return found


@dataclass
class _RefIndex:
    """One namespace's references, valid while its directories carry ``stamp``."""

    stamp: tuple[int, ...]
    owners: dict[RefKey, set[Owner]] = field(default_factory=dict)
    refs: dict[Owner, list[RefKey]] = field(default_factory=dict)

    def set(self, owner: Owner, keys: list[RefKey]) -> None:
        for key in self.refs.pop(owner, []):
            self.owners.get(key, set()).discard(owner)
        if keys:
            self.refs[owner] = keys
            for key in keys:
                self.owners.setdefault(key, set()).add(owner)


class LocalStore:
    """Implements the engine's Lookup over files in the state directory."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self._index: dict[str, _RefIndex] = {}
        self._swept: set[Path] = set()  # object directories cleaned of dead writers' temps
        self._unsynced: set[Path] = set()  # directories of renames not yet made durable
        self._lock = threading.Lock()  # the index, _swept and _unsynced, for the runner's workers

    def _read(self, plural: Plural, namespace: str, name: str) -> dict[str, Any] | None:
        return read_object(self.layout, plural, namespace, name)

    def _parse(self, data: dict[str, Any]) -> Stored:
        data = without_host_keys(data)
        try:
            if data.get("kind") == "DiskSnapshot":
                return DiskSnapshot.model_validate(data)
            if data.get("kind") == "VMDiskClass":
                return VMDiskClass.model_validate(data)
            return VMDisk.model_validate(data)
        except ValidationError as exc:
            raise CorruptObject(str(exc)) from exc

    def _recorded(self, data: dict[str, Any]) -> Recorded:
        found = data.get(FINGERPRINT)
        return self._parse(data), found if isinstance(found, str) else None

    def get(self, plural: Plural, namespace: str, name: str) -> Stored | None:
        found = self.get_recorded(plural, namespace, name)
        return None if found is None else found[0]

    def get_recorded(self, plural: Plural, namespace: str, name: str) -> Recorded | None:
        """``get``, with the fingerprint stored beside the status (``settled``), if any."""
        data = self._read(plural, namespace, name)
        return None if data is None else self._recorded(data)

    def get_disk(self, namespace: str, name: str) -> VMDisk | None:
        obj = self.get("vmdisks", namespace, name)
        return obj if isinstance(obj, VMDisk) else None

    def get_snapshot(self, namespace: str, name: str) -> DiskSnapshot | None:
        obj = self.get("disksnapshots", namespace, name)
        return obj if isinstance(obj, DiskSnapshot) else None

    def class_version(self, name: str) -> str:
        """The stored class's uid and generation (no validation), or "none" when there is none."""
        return class_version(self.layout, name)

    def get_class(self, name: str) -> VMDiskClass | None:
        obj = self.get("vmdiskclasses", CLUSTER_SCOPE, name)
        return obj if isinstance(obj, VMDiskClass) else None

    def list_classes(self) -> list[VMDiskClass]:
        found = self.list_objects("vmdiskclasses", CLUSTER_SCOPE)
        return [o for o in found if isinstance(o, VMDiskClass)]

    def list_objects(self, plural: Plural, namespace: str | None = None) -> list[Stored]:
        return [obj for obj, _ in self.list_recorded(plural, namespace)]

    def list_recorded(self, plural: Plural, namespace: str | None = None) -> list[Recorded]:
        """``list_objects``, each with its stored fingerprint (``settled``), if any."""
        root = self.layout.objects_dir(plural)
        pattern = f"{namespace}/*.json" if namespace else "*/*.json"
        return [self._recorded(json.loads(p.read_text())) for p in sorted(root.glob(pattern))]

    def list_disks(self, namespace: str) -> list[VMDisk]:
        return [o for o in self.list_objects("vmdisks", namespace) if isinstance(o, VMDisk)]

    def list_disks_everywhere(self) -> list[VMDisk]:
        return [o for o in self.list_objects("vmdisks") if isinstance(o, VMDisk)]

    def list_snapshots(self, namespace: str) -> list[DiskSnapshot]:
        return [
            o for o in self.list_objects("disksnapshots", namespace) if isinstance(o, DiskSnapshot)
        ]

    def snapshots_of(self, namespace: str, disk: str) -> list[DiskSnapshot]:
        found = (self.get_snapshot(namespace, n) for n in self._owners(namespace, "diskName", disk))
        return [s for s in found if s is not None and s.spec.disk_name == disk]

    def disks_from(self, namespace: str, kind: SourceKind, name: str) -> list[VMDisk]:
        found = (self.get_disk(namespace, n) for n in self._owners(namespace, kind, name))
        return [d for d in found if d is not None and _source_name(d, kind) == name]

    def _owners(self, namespace: str, kind: str, name: str) -> list[str]:
        """Names of the objects referring to ``name`` (re-read and checked by the callers)."""
        plural = "disksnapshots" if kind == "diskName" else "vmdisks"
        with self._lock:
            index = self._fresh_index(namespace)
            return sorted(n for p, n in index.owners.get((kind, name), set()) if p == plural)

    def _stamp(self, namespace: str) -> tuple[int, ...]:
        """What changes when anyone writes in the namespace's directories.

        The mtime alone has the clock's coarse tick: another process's new
        object in the same tick as our own last write would go unseen, so the
        number of entries is part of it too (a listing, no reads).
        """
        stamp = []
        for plural in _REF_PLURALS:
            directory = self.layout.objects_dir(plural) / namespace
            try:
                st = os.stat(directory)
                entries = len(os.listdir(directory))
            except FileNotFoundError:
                stamp += [0, 0, 0]
            else:
                stamp += [st.st_ino, st.st_mtime_ns, entries]
        return tuple(stamp)

    def _fresh_index(self, namespace: str) -> _RefIndex:
        stamp = self._stamp(namespace)
        index = self._index.get(namespace)
        if index is not None and index.stamp == stamp:
            return index
        # Another process wrote here (or first use): read the namespace once.
        index = _RefIndex(stamp)
        for plural in _REF_PLURALS:
            directory = self.layout.objects_dir(plural) / namespace
            try:
                names = [e.name for e in os.scandir(directory)]
            except FileNotFoundError:
                continue
            for entry in names:
                if entry.endswith(".json") and not entry.startswith("."):
                    data = self._read(plural, namespace, entry[: -len(".json")])
                    if data is not None:
                        index.set((plural, entry[: -len(".json")]), _refs_of(data))
        self._index[namespace] = index
        return index

    def _in_step(self, plural: Plural, namespace: str) -> bool:
        """True when this namespace's index saw every change so far (call before a write)."""
        with self._lock:
            return self._in_step_locked(plural, namespace)

    def _in_step_locked(self, plural: Plural, namespace: str) -> bool:
        index = self._index.get(namespace)
        if index is None or plural not in _REF_PLURALS:
            return False
        if index.stamp != self._stamp(namespace):
            del self._index[namespace]  # another process wrote: rebuilt on the next query
            return False
        return True

    def _noted(self, namespace: str, owner: Owner, data: dict[str, Any] | None) -> None:
        """Keep this namespace's index in step with a write (or removal) of our own."""
        with self._lock:
            index = self._index.get(namespace)
            if index is not None:
                index.set(owner, [] if data is None else _refs_of(data))
                index.stamp = self._stamp(namespace)

    def apply(self, obj: Stored) -> Stored:
        """Create or update from a manifest; generation grows only when the spec changes."""
        return self.put(obj).obj

    def put(self, obj: Stored, *, durable: bool = True, document: str | None = None) -> Applied:
        """``apply``, saying whether the object was stored as it is already.

        ``document`` is the digest of the manifest document ``obj`` was validated
        from (``objectfiles.document_digest``), recorded with it for the next
        re-apply.  ``durable`` False: the write's rename is made durable by ``sync``
        (see ``_write``).
        """
        plural = PLURALS[obj.kind]
        namespace, name = scope(obj), obj.metadata.name
        # Writes are renames, so a read without the lock sees a whole object; one
        # that is stored as applied (all of a no-op re-apply) needs no lock.
        seen = self._read(plural, namespace, name)
        if seen is not None:
            kept, applied = seen.pop(FINGERPRINT, None), seen.pop(APPLIED, None)
            if _merged(obj, seen) == seen and _recorded_as(applied, document, seen):
                # The stored spec is the manifest's, validated already: taken as it is.
                parsed = self._parse({**seen, "spec": obj.spec})
                return Applied(parsed, True, kept if isinstance(kept, str) else None)
        with file_lock(self.layout.lock("object", plural, namespace, name)):
            old = self._read(plural, namespace, name)
            kept, applied = None, None
            if old is not None:
                kept, applied = old.pop(FINGERPRINT, None), old.pop(APPLIED, None)
            new = _merged(obj, old)
            parsed = self._parse(new)
            unchanged = new == old
            # The fingerprint goes with any change: what it vouched for moved.  A new
            # record of the document alone changes nothing it vouched for.
            kept = kept if unchanged and isinstance(kept, str) else None
            if not unchanged or not _recorded_as(applied, document, new):
                self._write(plural, parsed, kept, durable=durable, document=document)
            return Applied(parsed, unchanged, kept)

    def save_status(
        self,
        obj: Resource,
        status: VMDiskStatus | DiskSnapshotStatus,
        fingerprint: str | None = None,
        *,
        durable: bool = True,
    ) -> Resource:
        """Write ``status`` onto the stored object (which must still exist).

        ``fingerprint`` is what ``status`` was reconciled against (``settled``);
        an object whose status and fingerprint are both as stored is not written.
        ``durable`` False: the write's rename is made durable by ``sync``.
        """
        plural = PLURALS[obj.kind]
        meta = obj.metadata
        with file_lock(self.layout.lock("object", plural, meta.namespace, meta.name)):
            data = self._read(plural, meta.namespace, meta.name)
            if data is None:
                return obj
            kept, applied = data.pop(FINGERPRINT, None), data.pop(APPLIED, None)
            unchanged = data.get("status") == (new := dump(status)) and kept == fingerprint
            data["status"] = new
            updated = self._parse(data)
            assert not isinstance(updated, VMDiskClass)
            if not unchanged:
                # The document's record holds: it leaves the status aside.
                stamp = applied if isinstance(applied, str) else None
                self._write(plural, updated, fingerprint, durable=durable, applied=stamp)
            return updated

    def remove(self, obj: Stored) -> None:
        plural, namespace, name = PLURALS[obj.kind], scope(obj), obj.metadata.name
        in_step = self._in_step(plural, namespace)
        remove_path(self.layout.object_file(plural, namespace, name))
        if in_step:
            self._noted(namespace, (plural, name), None)

    def sync(self) -> None:
        """Make the renames of every write made with ``durable`` False durable: one
        directory fsync for each directory written, for the whole batch."""
        with self._lock:
            directories, self._unsynced = self._unsynced, set()
        for directory in sorted(directories):
            fsync_dir(directory)

    def _write(
        self,
        plural: Plural,
        obj: Stored,
        fingerprint: str | None = None,
        *,
        durable: bool = True,
        document: str | None = None,
        applied: str | None = None,
    ) -> None:
        """Write ``obj``: its content always on stable storage before the rename.

        Beside it go ``fingerprint``, and the record of the manifest document it
        was applied from: made for ``document`` (its digest), or ``applied`` as
        it was stored.  ``durable`` False defers the directory's fsync to
        ``sync``, for a write whose loss in a power cut leaves a state the next
        reconcile finishes from (a spec about to be pinned, a Ready that the
        host's disk proves again).
        """
        namespace = scope(obj)
        path = self.layout.object_file(plural, namespace, obj.metadata.name)
        data = dump(obj)
        if document is not None:
            applied = applied_stamp(document, data)
        if applied is not None:
            data[APPLIED] = applied
        if fingerprint is not None:
            data[FINGERPRINT] = fingerprint
        with self._lock:
            sweep = path.parent not in self._swept
            self._swept.add(path.parent)
        if sweep:
            remove_stale_temps(path.parent)  # once per directory, not on every write
        # Specs may carry credentials (image URLs): root only.  One line: json's
        # C encoder (with indent, json encodes in Python, a third of a status write).
        text = json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n"
        in_step = self._in_step(plural, namespace)
        atomic_write(path, text, mode=0o600, sweep=False, sync_dir=durable)
        if not durable:
            with self._lock:
                self._unsynced.add(path.parent)
        if in_step:
            self._noted(namespace, (plural, obj.metadata.name), data)


def _recorded_as(applied: object, document: str | None, data: dict[str, Any]) -> bool:
    """Whether the stored record ``applied`` is ``document``'s (None: no document to record)."""
    return document is None or applied == applied_stamp(document, data)


def _merged(obj: Stored, old: dict[str, Any] | None) -> dict[str, Any]:
    """What storing ``obj`` over ``old`` (None: nothing stored) makes: a new object gets
    its uid; the stored one keeps uid, creation time and status, and its generation
    grows when the spec changed."""
    new = dump(obj)
    new.pop("status", None)
    if old is None:
        new["metadata"].update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=now_rfc3339())
        return new
    stored = {k: old["metadata"][k] for k in ("uid", "creationTimestamp", "generation")}
    new["metadata"].update(stored)
    if old.get("spec") != new["spec"]:
        new["metadata"]["generation"] = stored["generation"] + 1
    if "status" in old:
        new["status"] = old["status"]
    return new


def _source_name(disk: VMDisk, kind: SourceKind) -> str | None:
    ref = disk.spec.source.disk if kind == "disk" else disk.spec.source.snapshot
    return None if ref is None else ref.name
