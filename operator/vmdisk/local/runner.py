"""Local mode: the same engine driven from manifests, with the file-backed store."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..api.common import Condition
from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk, VMDiskStatus
from ..api.vmdiskclass import VMDiskClass
from ..config import Settings
from ..engine.reconcile import Engine
from ..engine.snapshots import delete_snapshot, reconcile_snapshot
from ..engine.status import with_condition
from ..errors import DiskInUse, HasDependents
from .store import PLURALS, LocalStore, Plural, Resource, Stored, scope

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
        self, settings: Settings, engine: Engine, store: LocalStore, workers: int = 1
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.workers = max(1, workers)

    def reconcile(self, obj: Resource) -> Resource:
        """Reconcile one stored object and save its status."""
        if isinstance(obj, DiskSnapshot):
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

        def publish(status: VMDiskStatus) -> None:
            published[:] = [(status, self.store.save_status(obj, status))]

        result = self.engine.reconcile_disk(obj, self.store, publish)
        if published and published[0][0] is result:
            return published[0][1]  # saved under the disk's lock already: no second read
        return self.store.save_status(obj, result)

    def apply(self, objects: Sequence[Stored]) -> list[Stored]:
        """Store and reconcile ``objects``; dependencies are retried until nothing moves.

        Classes are stored first (they have nothing to reconcile), so disks of
        the same batch find them.
        """
        classes: list[Stored] = [self.store.apply(o) for o in objects if isinstance(o, VMDiskClass)]
        stored: list[Resource] = []
        for obj in objects:
            if not isinstance(obj, VMDiskClass):
                saved = self.store.apply(obj)
                assert not isinstance(saved, VMDiskClass)
                stored.append(saved)
        results: dict[int, Resource] = {}
        # Independent objects concurrently, each round after the one it is made from;
        # the loop below then retries whatever still waits, one at a time.
        with ThreadPoolExecutor(self.workers, thread_name_prefix="vmdisk") as pool:
            for indexes in waves(stored):
                done = pool.map(lambda i: (i, self.reconcile(stored[i])), indexes)
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

    def delete(self, objects: Sequence[Stored]) -> list[str]:
        """Delete objects, snapshots first, classes last; returns the problems (none: all went)."""
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
