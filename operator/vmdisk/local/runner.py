"""Local mode: the same engine driven from manifests, with the file-backed store."""

from __future__ import annotations

import logging
from collections.abc import Sequence

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


class LocalRunner:
    def __init__(self, settings: Settings, engine: Engine, store: LocalStore) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store

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

        def publish(status: VMDiskStatus) -> None:
            self.store.save_status(obj, status)

        return self.store.save_status(obj, self.engine.reconcile_disk(obj, self.store, publish))

    def apply(self, objects: Sequence[Stored]) -> list[Stored]:
        """Store and reconcile ``objects``; dependencies are retried until nothing moves.

        Classes are stored first (they have nothing to reconcile), so disks of
        the same batch find them.
        """
        classes: list[Stored] = [self.store.apply(o) for o in objects if isinstance(o, VMDiskClass)]
        stored = [self.store.apply(obj) for obj in objects if not isinstance(obj, VMDiskClass)]
        results: dict[int, Resource] = {}
        pending = list(range(len(stored)))
        first = True
        while pending:
            waiting = []
            for index in pending:
                # Just stored, so fresh on the first pass; retries read what others wrote.
                current = stored[index] if first else self.store.get(*_key(stored[index]))
                current = current or stored[index]
                assert not isinstance(current, VMDiskClass)
                results[index] = self.reconcile(current)
                if _waiting(results[index]):
                    waiting.append(index)
            if len(waiting) == len(pending):
                break  # no progress: the dependencies are not in this batch
            pending, first = waiting, False
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
