"""kopf handlers: parse at the edge, call the engine, write status and events.

Everything is registered on a registry passed in (no global state), with the
node's filter, so an agent only ever handles its own node's objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError

from ..api.common import GROUP, VERSION, Condition, dump
from ..api.snapshot import DiskSnapshot, DiskSnapshotStatus
from ..api.vmdisk import VMDisk, VMDiskStatus
from ..errors import HasDependents, InvalidSpec, VMDiskError
from ..manifests import describe_errors
from ..reconcile import Engine
from ..snapshots import delete_snapshot, reconcile_snapshot
from ..status import S, failed_status, with_condition
from .lookup import IndexLookup

log = logging.getLogger(__name__)
Status = VMDiskStatus | DiskSnapshotStatus


def backoff(retry: int) -> float:
    """Exponential retry delay: 5 s, 10 s, 20 s ... capped at 5 minutes."""
    return float(min(300, 5 * 2 ** min(retry, 10)))


def _ready(status: Status) -> Condition | None:
    return next((c for c in status.conditions if c.type == "Ready"), None)


def _report(body: Any, old: Status | None, new: Status) -> None:
    """A Kubernetes Event for every change of phase or reason, none for repeats."""
    after = _ready(new)
    if after is None:
        return
    before = _ready(old) if old is not None else None
    if (
        old is not None
        and before is not None
        and (old.phase, before.reason)
        == (
            new.phase,
            after.reason,
        )
    ):
        return
    if after.status == "True":
        kopf.info(body, reason=after.reason, message=after.message)
    else:
        kopf.warn(body, reason=after.reason, message=after.message)


def _finish(body: Any, patch: Any, old: Status | None, new: Status, retry: int) -> None:
    """Write status; ask kopf to retry (with backoff) only for temporary failures."""
    patch.status.update(dump(new))
    _report(body, old, new)
    ready = _ready(new)
    if ready is not None and ready.status != "True" and new.phase != "Failed":
        raise kopf.TemporaryError(f"{ready.reason}: {ready.message}", delay=backoff(retry))


def _invalid(body: Any, exc: ValidationError, status: S) -> S:
    message = "; ".join(describe_errors(exc))
    return failed_status(status, body.get("metadata", {}).get("generation"), InvalidSpec(message))


def register(
    registry: kopf.OperatorRegistry, engine: Engine, *, verify_interval: float = 60.0
) -> None:
    """Register every handler of this node's agent on ``registry``."""
    node = engine.settings.node_name

    def on_this_node(*, spec: Any, **_: Any) -> bool:
        return bool(spec.get("nodeName") == node)

    def disk_on_this_node(*, spec: Any, namespace: Any, **kwargs: Any) -> bool:
        # DiskSnapshots carry no node: they belong to the node of their disk.
        return (namespace, spec.get("diskName")) in kwargs["node_disks"]

    @kopf.index(GROUP, VERSION, "vmdisks", when=on_this_node, id="node_disks", registry=registry)
    def node_disks(*, namespace: Any, name: Any, body: Any, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): dict(body)}

    @kopf.index(GROUP, VERSION, "disksnapshots", id="snapshots", registry=registry)
    def snapshots(*, namespace: Any, name: Any, body: Any, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): dict(body)}

    def lookup(kwargs: dict[str, Any]) -> IndexLookup:
        return IndexLookup(kwargs["node_disks"], kwargs["snapshots"])

    def publisher(memo: Any, plural: str, meta: Any) -> Callable[[VMDiskStatus], None]:
        def publish(status: VMDiskStatus) -> None:
            api = getattr(memo, "api", None)
            if api is None:
                return
            try:
                api.patch_status(plural, meta["namespace"], meta["name"], dump(status))
            except VMDiskError as exc:  # progress is best effort; the handler goes on
                log.debug("progress not published: %s", exc)

        return publish

    @kopf.on.resume(
        GROUP, VERSION, "vmdisks", when=on_this_node, id="vmdisk_changed", registry=registry
    )
    @kopf.on.create(
        GROUP, VERSION, "vmdisks", when=on_this_node, id="vmdisk_changed", registry=registry
    )
    @kopf.on.update(
        GROUP,
        VERSION,
        "vmdisks",
        when=on_this_node,
        field="spec",
        id="vmdisk_changed",
        registry=registry,
    )
    def vmdisk_changed(
        *, body: Any, meta: Any, patch: Any, retry: Any, memo: Any, **kw: Any
    ) -> None:
        old = VMDiskStatus.model_validate(body.get("status") or {})
        try:
            disk = VMDisk.model_validate(dict(body))
        except ValidationError as exc:
            _finish(body, patch, old, _invalid(body, exc, old), retry)
            return
        publish = publisher(memo, "vmdisks", meta)
        new = engine.reconcile_disk(disk, lookup(kw), publish)
        _finish(body, patch, old if body.get("status") else None, new, retry)

    @kopf.on.delete(
        GROUP, VERSION, "vmdisks", when=on_this_node, id="vmdisk_deleted", registry=registry
    )
    def vmdisk_deleted(*, body: Any, patch: Any, retry: Any, **kw: Any) -> None:
        try:
            disk = VMDisk.model_validate(dict(body))
        except ValidationError:
            return  # never provisioned: nothing on the host to remove
        try:
            engine.delete_disk(disk, lookup(kw))
        except HasDependents as exc:
            old = disk.status or VMDiskStatus()
            new = with_condition(
                old,
                Condition(type="Ready", status="False", reason=exc.reason, message=exc.message),
            ).model_copy(update={"phase": "Deleting"})
            patch.status.update(dump(new))
            _report(body, old, new)
            raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from exc
        kopf.info(
            body, reason="Deleted", message=f"disk data removed ({disk.spec.deletion_policy})"
        )

    @kopf.timer(
        GROUP,
        VERSION,
        "vmdisks",
        interval=verify_interval,
        initial_delay=verify_interval,
        when=on_this_node,
        id="vmdisk_verified",
        registry=registry,
    )
    def vmdisk_verified(*, body: Any, patch: Any, **_: Any) -> None:
        try:
            disk = VMDisk.model_validate(dict(body))
        except ValidationError:
            return
        new = engine.verify_disk(disk)
        if new is not None:
            patch.status.update(dump(new))
            _report(body, disk.status, new)

    @kopf.on.resume(
        GROUP,
        VERSION,
        "disksnapshots",
        when=disk_on_this_node,
        id="snapshot_changed",
        registry=registry,
    )
    @kopf.on.create(
        GROUP,
        VERSION,
        "disksnapshots",
        when=disk_on_this_node,
        id="snapshot_changed",
        registry=registry,
    )
    @kopf.on.update(
        GROUP,
        VERSION,
        "disksnapshots",
        when=disk_on_this_node,
        field="spec",
        id="snapshot_changed",
        registry=registry,
    )
    def snapshot_changed(*, body: Any, patch: Any, retry: Any, **kw: Any) -> None:
        old = DiskSnapshotStatus.model_validate(body.get("status") or {})
        try:
            snap = DiskSnapshot.model_validate(dict(body))
        except ValidationError as exc:
            _finish(body, patch, old, _invalid(body, exc, old), retry)
            return
        new = reconcile_snapshot(engine, snap, lookup(kw))
        _finish(body, patch, old if body.get("status") else None, new, retry)

    @kopf.on.delete(
        GROUP,
        VERSION,
        "disksnapshots",
        when=disk_on_this_node,
        id="snapshot_deleted",
        registry=registry,
    )
    def snapshot_deleted(*, body: Any, retry: Any, **kw: Any) -> None:
        try:
            snap = DiskSnapshot.model_validate(dict(body))
        except ValidationError:
            return
        try:
            delete_snapshot(engine, snap, lookup(kw))
        except HasDependents as exc:
            kopf.warn(body, reason=exc.reason, message=exc.message)
            raise kopf.TemporaryError(exc.message, delay=backoff(retry)) from exc
