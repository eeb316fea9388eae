"""kopf handlers: parse at the edge, call the engine, write status and events.

Everything is registered on a registry passed in (no global state), with the
node's filter, so an agent only ever handles its own node's objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import kopf
from pydantic import ValidationError

from ..api.common import GROUP, VERSION, Condition, dump
from ..api.errors import describe_errors
from ..api.snapshot import DiskSnapshot, DiskSnapshotStatus
from ..api.vmdisk import VMDisk, VMDiskStatus
from ..engine.reconcile import Engine
from ..engine.snapshots import delete_snapshot, reconcile_snapshot
from ..engine.status import S, failed_status, with_condition
from ..errors import DiskInUse, HasDependents, InvalidSpec, VMDiskError
from .lookup import IndexLookup

log = logging.getLogger(__name__)
Status = VMDiskStatus | DiskSnapshotStatus
Handler = TypeVar("Handler", bound=Callable[..., Any])


def backoff(retry: int) -> float:
    """Exponential retry delay: 5 s, 10 s, 20 s ... capped at 5 minutes."""
    return float(min(300, 5 * 2 ** min(retry, 10)))


def _ready(status: Status | None) -> Condition | None:
    if status is None:
        return None
    return next((c for c in status.conditions if c.type == "Ready"), None)


def _report(body: Any, old: Status | None, new: Status) -> None:
    """A Kubernetes Event for every change of phase or reason, none for repeats."""
    before, after = _ready(old), _ready(new)
    if after is None:
        return
    unchanged = old is not None and old.phase == new.phase
    if unchanged and before is not None and before.reason == after.reason:
        return
    if after.status == "True":
        kopf.info(body, reason=after.reason, message=after.message)
    else:
        kopf.warn(body, reason=after.reason, message=after.message)


def _retry_later(message: str, retry: int) -> kopf.TemporaryError:
    return kopf.TemporaryError(message, delay=backoff(retry))


def _reconciled(
    body: Any,
    patch: Any,
    retry: int,
    model: type[VMDisk] | type[DiskSnapshot],
    status_model: type[S],
    reconcile: Callable[[Any], S],
) -> None:
    """Parse, reconcile, write status and events; retry (with backoff) only temporary failures."""
    old = status_model.model_validate(body.get("status") or {})
    try:
        new = reconcile(model.model_validate(dict(body)))
    except ValidationError as exc:
        generation = body.get("metadata", {}).get("generation")
        new = failed_status(old, generation, InvalidSpec("; ".join(describe_errors(exc))))
    patch.status.update(dump(new))
    _report(body, old if body.get("status") else None, new)
    ready = _ready(new)
    if ready is not None and ready.status != "True" and new.phase != "Failed":
        raise _retry_later(f"{ready.reason}: {ready.message}", retry)


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

    def on_changes(plural: str, when: Any, handler_id: str) -> Callable[[Handler], Handler]:
        """Resume, create and spec updates all lead to the same level-based handler."""

        def decorate(fn: Handler) -> Handler:
            for on in (kopf.on.resume, kopf.on.create):
                on(GROUP, VERSION, plural, when=when, id=handler_id, registry=registry)(fn)
            kopf.on.update(
                GROUP, VERSION, plural, when=when, field="spec", id=handler_id, registry=registry
            )(fn)
            return fn

        return decorate

    @kopf.index(GROUP, VERSION, "vmdisks", when=on_this_node, id="node_disks", registry=registry)
    def node_disks(*, namespace: Any, name: Any, body: Any, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): dict(body)}

    @kopf.index(GROUP, VERSION, "disksnapshots", id="snapshots", registry=registry)
    def snapshots(*, namespace: Any, name: Any, body: Any, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): dict(body)}

    def lookup(kwargs: dict[str, Any]) -> IndexLookup:
        return IndexLookup(kwargs["node_disks"], kwargs["snapshots"])

    def publisher(memo: Any, meta: Any) -> Callable[[VMDiskStatus], None]:
        def publish(status: VMDiskStatus) -> None:
            api = getattr(memo, "api", None)
            if api is None:
                return
            try:
                api.patch_status("vmdisks", meta["namespace"], meta["name"], dump(status))
            except VMDiskError as exc:  # progress is best effort; the handler goes on
                log.debug("progress not published: %s", exc)

        return publish

    @on_changes("vmdisks", on_this_node, "vmdisk_changed")
    def vmdisk_changed(
        *, body: Any, meta: Any, patch: Any, retry: Any, memo: Any, **kw: Any
    ) -> None:
        publish = publisher(memo, meta)
        _reconciled(
            body,
            patch,
            retry,
            VMDisk,
            VMDiskStatus,
            lambda disk: engine.reconcile_disk(disk, lookup(kw), publish),
        )

    @kopf.on.delete(
        GROUP, VERSION, "vmdisks", when=on_this_node, id="vmdisk_deleted", registry=registry
    )
    def vmdisk_deleted(*, body: Any, patch: Any, retry: Any, **kw: Any) -> None:
        try:
            disk = VMDisk.model_validate(dict(body))
        except ValidationError:
            return  # never provisioned: nothing on the host to remove
        try:
            outcome = engine.delete_disk(disk, lookup(kw))
        except (HasDependents, DiskInUse) as exc:
            old = disk.status or VMDiskStatus()
            refused = Condition(
                type="Ready", status="False", reason=exc.reason, message=exc.message
            )
            new = with_condition(old, refused).model_copy(update={"phase": "Deleting"})
            patch.status.update(dump(new))
            _report(body, old, new)
            raise _retry_later(exc.message, retry) from exc
        kopf.info(body, reason="Deleted", message=outcome)

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

    @on_changes("disksnapshots", disk_on_this_node, "snapshot_changed")
    def snapshot_changed(*, body: Any, patch: Any, retry: Any, **kw: Any) -> None:
        _reconciled(
            body,
            patch,
            retry,
            DiskSnapshot,
            DiskSnapshotStatus,
            lambda snap: reconcile_snapshot(engine, snap, lookup(kw)),
        )

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
        except (HasDependents, DiskInUse) as exc:
            kopf.warn(body, reason=exc.reason, message=exc.message)
            raise _retry_later(exc.message, retry) from exc
