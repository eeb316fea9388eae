"""The engine's Lookup over kopf's in-memory indexes (no API calls per lookup).

kopf changes its indexes on the event loop while sync handlers run in worker
threads, so a worker never walks an index itself: ``LoopReads`` runs each
read on the loop (a copy of what is asked for comes back) and the models are
parsed in the worker.  Every indexed value is an ``Indexed`` body that is
parsed at most once; kopf replaces it when its object changes and drops it
when the object goes.  Who depends on a disk is asked of two more indexes,
keyed by what an object is made from, so a deletion touches its dependents
only, never every object of the namespace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk
from ..api.vmdiskclass import VMDiskClass
from ..engine.ports import SourceKind

log = logging.getLogger(__name__)
Key = tuple[str, str]
M = TypeVar("M", VMDisk, DiskSnapshot, VMDiskClass)
T = TypeVar("T")
K = TypeVar("K")
_UNPARSED = object()
READ_TIMEOUT = 60.0  # a loop this late is stuck; the handler fails and kopf retries it


class Indexed:
    """One object's body as kopf's index holds it, with its model parsed once, on demand."""

    __slots__ = ("_model", "body")

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = dict(body)
        self._model: object = _UNPARSED

    def model(self, model: type[M]) -> M | None:
        """The body as ``model``; None when invalid (its own handler reports the spec)."""
        parsed = self._model
        if parsed is _UNPARSED:
            # Two workers may both parse a fresh body: the same frozen result either way.
            try:
                parsed = model.model_validate(self.body)
            except ValidationError:
                parsed = None
            self._model = parsed
        return parsed if isinstance(parsed, model) else None


class LoopReads:
    """Runs reads of kopf's indexes on the event loop that changes them.

    Unbound (no loop yet, or a test without one), reads run where they are called.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, read: Callable[[], T]) -> T:
        loop = self.loop
        if loop is None or loop.is_closed() or _running_loop() is loop:
            return read()

        async def on_loop() -> T:
            return read()

        return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(READ_TIMEOUT)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _values(stores: Iterable[Iterable[Any]]) -> list[Any]:
    return [value for store in stores for value in store]


def _parsed(model: type[M], values: Iterable[Any]) -> list[M]:
    found = (v.model(model) if isinstance(v, Indexed) else _parse(model, v) for v in values)
    return [m for m in found if m is not None]


def _parse(model: type[M], raw: Any) -> M | None:
    try:
        return model.model_validate(dict(raw))
    except ValidationError:
        return None  # its own handler reports the invalid spec


SourceKey = tuple[str, str, str]  # (namespace, "disk" | "snapshot" | "diskName", name)


def source_keys(namespace: Any, spec: Any) -> list[SourceKey]:
    """What a raw VMDisk or DiskSnapshot ``spec`` is made from, as keys of the
    by-source index (malformed specs have none: their own handler reports them)."""
    if not isinstance(namespace, str) or not isinstance(spec, Mapping):
        return []
    if isinstance(spec.get("diskName"), str):  # a DiskSnapshot
        return [(namespace, "diskName", spec["diskName"])]
    source = spec.get("source")
    keys = []
    for kind in ("disk", "snapshot"):
        ref = source.get(kind) if isinstance(source, Mapping) else None
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
            keys.append((namespace, kind, ref["name"]))
    return keys


class IndexLookup:
    """Reads VMDisks and DiskSnapshots from kopf indexes keyed by (namespace, name),
    and VMDiskClasses from one keyed by name; the index values are ``Indexed`` bodies
    (plain bodies are parsed on every read).  ``sources`` are indexes from
    ``source_keys`` to object names; without them, dependents are found by
    scanning the namespace."""

    def __init__(
        self,
        disks: Mapping[Key, Iterable[Any]],
        snapshots: Mapping[Key, Iterable[Any]],
        classes: Mapping[str, Iterable[Any]] | None = None,
        reads: LoopReads | None = None,
        sources: Sequence[Mapping[SourceKey, Iterable[str]]] = (),
    ) -> None:
        self.disks = disks
        self.snapshots = snapshots
        self.classes: Mapping[str, Iterable[Any]] = classes or {}
        self.reads = reads or LoopReads()
        self.sources = sources

    def _dependents(
        self, model: type[M], index: Mapping[Key, Iterable[Any]], key: SourceKey
    ) -> list[M] | None:
        """The objects of ``index`` made from ``key``, or None without sources indexes."""
        sources = self.sources
        if not sources:
            return None
        namespace = key[0]

        def read() -> list[Any]:
            names = {n for source in sources for n in (source.get(key) or ())}
            return [v for n in names for v in list(index.get((namespace, n)) or ())[:1]]

        return _parsed(model, self.reads.run(read))

    def _one(self, model: type[M], index: Mapping[K, Iterable[Any]], key: K) -> M | None:
        values = self.reads.run(lambda: list(index.get(key) or ())[:1])
        return next(iter(_parsed(model, values)), None)

    def _namespace(
        self, model: type[M], index: Mapping[Key, Iterable[Any]], namespace: str
    ) -> list[M]:
        values = self.reads.run(
            lambda: _values(store for (ns, _), store in index.items() if ns == namespace)
        )
        return _parsed(model, values)

    def get_class(self, name: str) -> VMDiskClass | None:
        return self._one(VMDiskClass, self.classes, name)

    def list_classes(self) -> list[VMDiskClass]:
        index = self.classes
        values = self.reads.run(lambda: [v for store in index.values() for v in list(store)[:1]])
        return _parsed(VMDiskClass, values)

    def get_disk(self, namespace: str, name: str) -> VMDisk | None:
        return self._one(VMDisk, self.disks, (namespace, name))

    def get_snapshot(self, namespace: str, name: str) -> DiskSnapshot | None:
        return self._one(DiskSnapshot, self.snapshots, (namespace, name))

    def list_disks(self, namespace: str) -> list[VMDisk]:
        return self._namespace(VMDisk, self.disks, namespace)

    def list_snapshots(self, namespace: str) -> list[DiskSnapshot]:
        return self._namespace(DiskSnapshot, self.snapshots, namespace)

    def snapshots_of(self, namespace: str, disk: str) -> list[DiskSnapshot]:
        found = self._dependents(DiskSnapshot, self.snapshots, (namespace, "diskName", disk))
        candidates = self.list_snapshots(namespace) if found is None else found
        return [s for s in candidates if s.spec.disk_name == disk]

    def disks_from(self, namespace: str, kind: SourceKind, name: str) -> list[VMDisk]:
        found = self._dependents(VMDisk, self.disks, (namespace, kind, name))
        candidates = self.list_disks(namespace) if found is None else found
        return [d for d in candidates if _source_name(d, kind) == name]


def _source_name(disk: VMDisk, kind: SourceKind) -> str | None:
    ref = disk.spec.source.disk if kind == "disk" else disk.spec.source.snapshot
    return None if ref is None else ref.name
