"""Local mode: the same engine driven from manifests, with the file-backed store."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..api.common import Condition, dump
from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk, VMDiskStatus
from ..api.vmdiskclass import VMDiskClass
from ..config import Settings
from ..engine.status import with_condition
from ..errors import DiskInUse, HasDependents
from .objectfiles import Plural
from .settled import around, fingerprint
from .store import PLURALS, LocalStore, Resource, Stored, scope

if TYPE_CHECKING:
    from ..engine.reconcile import Engine

log = logging.getLogger(__name__)


def _waiting(obj: Resource) -> bool:
    status = obj.status
    if status is None:
        return True
    return any(c.type == "Ready" and c.reason == "WaitingForDependency" for c in status.conditions)


def default_workers() -> int:
    """One worker per CPU this process may use: disks are mostly qemu-img and fsync."""
    return max(1, len(os.sched_getaffinity(0)))


def _needs(obj: Resource) -> list[tuple[Plural, str]]:
    """The objects (plural, name) in ``obj``'s namespace that it is made from."""
    if isinstance(obj, DiskSnapshot):
        return [("vmdisks", obj.spec.disk_name)]
    source = obj.spec.source
    if source.disk is not None:
        return [("vmdisks", source.disk.name)]
    if source.snapshot is not None:
        return [("disksnapshots", source.snapshot.name)]
    return []


def waves(objects: Sequence[Resource]) -> list[list[int]]:
    """Indexes of ``objects`` in rounds: each after the round holding what it is made from.

    Objects of one round are independent of each other and run concurrently; what
    waits on something outside the batch (or on a cycle) goes in the last round.
    """
    where = {
        (PLURALS[o.kind], o.metadata.namespace, o.metadata.name): i for i, o in enumerate(objects)
    }
    round_of: dict[int, int] = {}

    def depth(index: int, seen: frozenset[int]) -> int:
        if index in round_of:
            return round_of[index]
        obj = objects[index]
        deps = [where.get((p, scope(obj), n)) for p, n in _needs(obj)]
        inside = [d for d in deps if d is not None and d != index]
        if any(d in seen for d in inside):
            level = len(objects)  # a cycle: last, the retry loop reports it
        else:
            level = max((depth(d, seen | {index}) + 1 for d in inside), default=0)
        round_of[index] = level
        return level

    for index in range(len(objects)):
        depth(index, frozenset())
    rounds: dict[int, list[int]] = {}
    for index, level in round_of.items():
        rounds.setdefault(level, []).append(index)
    return [sorted(rounds[level]) for level in sorted(rounds)]


class LocalRunner:
    def __init__(
        self, settings: Settings, engine: Engine | None, store: LocalStore, workers: int = 1
    ) -> None:
        """``engine`` None: built from ``settings`` when first needed (a no-op apply never is)."""
        self.settings = settings
        self._engine = engine
        self._building = threading.Lock()
        self.store = store
        self.workers = max(1, workers)
        self._around = around(settings)

    @property
    def engine(self) -> Engine:
        with self._building:
            if self._engine is None:
                from ..engine.reconcile import Engine

                self._engine = Engine.build(self.settings)
            return self._engine

    def close(self) -> None:
        """Close the engine's connections, if it was ever built."""
        if self._engine is not None:
            self._engine.close()

    def _fingerprint_of(self, disk: VMDisk, status: VMDiskStatus) -> str | None:
        """The fingerprint ``status`` would be saved with (None unless it is a settled Ready)."""
        disk = disk.model_copy(update={"status": status})
        return self._fingerprint(disk, self.store.class_version)

    def _fingerprint(self, disk: VMDisk, class_version: Callable[[str], str]) -> str | None:
        """The disk's fingerprint now (``settled``), or None when it can have none."""
        return fingerprint(dump(disk), self._around, class_version)

    def reconcile(self, obj: Resource) -> Resource:
        """Reconcile one stored object and save its status."""
        if isinstance(obj, DiskSnapshot):
            from ..engine.snapshots import reconcile_snapshot

            return self.store.save_status(obj, reconcile_snapshot(self.engine, obj, self.store))
        node = obj.spec.node_name
        if node and node != self.settings.node_name:
            status = with_condition(
                obj.status or VMDiskStatus(),
                Condition(
                    type="Ready",
                    status="False",
                    reason="OtherNode",
                    message=f"spec.nodeName is {node!r}; this node is "
                    f"{self.settings.node_name!r} (set --node or VMDISK_NODE_NAME)",
                    observed_generation=obj.metadata.generation,
                ),
            )
            return self.store.save_status(obj, status)

        published: list[tuple[VMDiskStatus, Resource]] = []
        pinned = [obj.status.pinned_class if obj.status else None]

        def publish(status: VMDiskStatus) -> None:
            # A new pin is durable before anything is made with it: a power cut
            # must not forget where a disk is (or is half made).  Any other
            # status the host proves again; ``apply`` syncs it with the batch.
            durable = status.pinned_class != pinned[0]
            pinned[0] = status.pinned_class
            fingerprint = self._fingerprint_of(obj, status)
            saved = self.store.save_status(obj, status, fingerprint, durable=durable)
            published[:] = [(status, saved)]

        result = self.engine.reconcile_disk(obj, self.store, publish)
        if published and published[0][0] is result:
            return published[0][1]  # saved under the disk's lock already: no second read
        durable = result.pinned_class != pinned[0]
        return self.store.save_status(
            obj, result, self._fingerprint_of(obj, result), durable=durable
        )

    def apply(
        self, objects: Sequence[Stored], documents: Sequence[str | None] | None = None
    ) -> list[Stored]:
        """Store and reconcile ``objects``; dependencies are retried until nothing moves.

        ``documents``: the digests of the manifest documents the objects were
        validated from, one each, recorded with them (see ``LocalStore.put``).
        Classes are stored first (they have nothing to reconcile), so disks of
        the same batch find them.  Every write is durable when this returns: the
        renames that need not be durable one by one are synced once, at the end.
        """
        try:
            return self._apply(objects, documents or [None] * len(objects))
        finally:
            self.store.sync()

    def _apply(self, objects: Sequence[Stored], documents: Sequence[str | None]) -> list[Stored]:
        classes: list[Stored] = [
            self.store.put(o, document=d).obj
            for o, d in zip(objects, documents, strict=True)
            if isinstance(o, VMDiskClass)
        ]
        stored: list[Resource] = []
        results: dict[int, Resource] = {}
        versions = functools.cache(self.store.class_version)  # read once for the batch
        for obj, document in zip(objects, documents, strict=True):
            if not isinstance(obj, VMDiskClass):
                # durable with its pin, or by sync
                saved = self.store.put(obj, durable=False, document=document)
                assert not isinstance(saved.obj, VMDiskClass)
                if saved.unchanged and self.settled(saved.obj, saved.fingerprint, versions):
                    results[len(stored)] = saved.obj  # nothing it depends on moved
                stored.append(saved.obj)
        todo = [i for i in range(len(stored)) if i not in results]
        # Independent objects concurrently, each round after the one it is made from;
        # the loop below then retries whatever still waits, one at a time.
        with ThreadPoolExecutor(self.workers, thread_name_prefix="vmdisk") as pool:
            for indexes in waves([stored[i] for i in todo]):
                done = pool.map(
                    lambda i: (i, self.reconcile(stored[i])), [todo[i] for i in indexes]
                )
                results.update(done)
        pending = [i for i in range(len(stored)) if _waiting(results[i])]
        while pending:
            waiting = []
            for index in pending:
                current = self.store.get(*_key(stored[index])) or stored[index]
                assert not isinstance(current, VMDiskClass)
                results[index] = self.reconcile(current)
                if _waiting(results[index]):
                    waiting.append(index)
            if len(waiting) == len(pending):
                break  # no progress: the dependencies are not in this batch
            pending = waiting
        return [*classes, *(results[i] for i in range(len(stored)))]

    def settled(
        self, obj: Stored, recorded: str | None, class_version: Callable[[str], str]
    ) -> bool:
        """Whether a stored disk is as its status says: ``recorded`` (its stored
        fingerprint) still holds, so neither a reconcile nor a check would change it."""
        if not isinstance(obj, VMDisk) or recorded is None:
            return False
        return self._fingerprint(obj, class_version) == recorded

    def delete(self, objects: Sequence[Stored]) -> list[str]:
        """Delete objects, snapshots first, classes last; returns the problems (none: all went)."""
        from ..engine.snapshots import delete_snapshot

        problems = []
        ordered: list[Stored] = [o for o in objects if isinstance(o, DiskSnapshot)]
        ordered += [o for o in reversed(objects) if isinstance(o, VMDisk)]
        ordered += [o for o in objects if isinstance(o, VMDiskClass)]
        for obj in ordered:
            current = self.store.get(*_key(obj))
            if current is None:
                problems.append(f"{obj.kind}/{obj.metadata.name}: not found")
                continue
            try:
                outcome = "snapshot removed"
                if isinstance(current, DiskSnapshot):
                    delete_snapshot(self.engine, current, self.store)
                elif isinstance(current, VMDisk):
                    outcome = self.engine.delete_disk(current, self.store)
            except (HasDependents, DiskInUse) as exc:
                problems.append(f"{obj.kind}/{obj.metadata.name}: {exc.message} ({exc.reason})")
                continue
            self.store.remove(current)
            log.info("deleted %s/%s: %s", obj.kind, obj.metadata.name, outcome)
        return problems


def _key(obj: Stored) -> tuple[Plural, str, str]:
    return PLURALS[obj.kind], scope(obj), obj.metadata.name
