"""kopf handlers: parse at the edge, call the engine, write status and events.

Everything is registered on a registry passed in (no global state), with the
node's filter, so an agent only ever handles its own node's objects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

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
from .lookup import Indexed, IndexLookup, LoopReads, source_keys

log = logging.getLogger(__name__)
Status = VMDiskStatus | DiskSnapshotStatus
Handler = TypeVar("Handler", bound=Callable[..., Any])
M = TypeVar("M", bound=VMDisk | DiskSnapshot)
T = TypeVar("T", bound=VMDiskStatus | DiskSnapshotStatus)


def backoff(retry: int, reason: str | None = None) -> float:
    """Exponential retry delay: 5 s, 10 s, 20 s ... capped at 5 minutes.

    A disk in use waits for a VM to stop, which people do while watching:
    it is looked at again at least every 30 s.
    """
    cap = 30 if reason == DiskInUse.reason else 300
    return float(min(cap, 5 * 2 ** min(retry, 10)))


def _ready(status: Status | None, kind: str = "Ready") -> Condition | None:
    if status is None:
        return None
    return next((c for c in status.conditions if c.type == kind), None)


def _report(body: Any, old: Status | None, new: Status) -> None:
    """A Kubernetes Event for every change of phase or reason, none for repeats.

    A refused change leaves ``Ready`` as it was, so it gets its own Warning.
    """
    refused, was_refused = _ready(new, "ChangeRefused"), _ready(old, "ChangeRefused")
    if refused is not None and (was_refused is None or was_refused.message != refused.message):
        kopf.warn(body, reason=refused.reason, message=refused.message)
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


def _retry_later(message: str, retry: int, reason: str | None = None) -> kopf.TemporaryError:
    return kopf.TemporaryError(message, delay=backoff(retry, reason))


def parse_status(raw: Any, status_model: type[T]) -> T | None:
    """The object's status, or None when it is absent or malformed.

    A status written past admission (by hand, by an old agent) must never
    stop the handler: it is rebuilt from the host and the spec.
    """
    if not raw:
        return None
    try:
        return cast(T, status_model.model_validate(raw))
    except ValidationError as exc:
        log.warning("ignoring a malformed status: %s", "; ".join(describe_errors(exc)))
        return None


def parse_object(body: Any, model: type[M], status_model: type[T]) -> M:
    """The object with its status, or without it when the status is malformed.

    Raises ValidationError only for the rest of the object (its spec).
    """
    keep_status = parse_status(body.get("status"), status_model) is not None
    kept = {k: v for k, v in dict(body).items() if k != "status" or keep_status}
    return cast(M, model.model_validate(kept))


def snapshot_disk(namespace: Any, spec: Any) -> tuple[Any, str] | None:
    """The (namespace, name) of a raw DiskSnapshot's disk; None when ``diskName`` is no name.

    Filters see the raw object before any model does: ``diskName`` may be
    any JSON value there (a list would not even hash).
    """
    disk_name = spec.get("diskName") if isinstance(spec, Mapping) else None
    return (namespace, disk_name) if isinstance(disk_name, str) else None


def _clearing(raw: Any, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` as a merge patch that also removes whatever else a malformed status held."""
    stale = raw.keys() - new.keys() if isinstance(raw, Mapping) else set()
    return {**dict.fromkeys(stale), **new}


class Publisher:
    """Publishes a disk's status while its handler runs; remembers what it last wrote."""

    def __init__(self, memo: Any, meta: Any) -> None:
        self.memo, self.meta = memo, meta
        self.written: dict[str, Any] | None = None

    def __call__(self, status: VMDiskStatus) -> None:
        api = getattr(self.memo, "api", None)
        if api is None:
            return
        body = dump(status)
        try:
            api.patch_status("vmdisks", self.meta["namespace"], self.meta["name"], body)
        except VMDiskError as exc:  # progress is best effort; the handler goes on
            log.debug("progress not published: %s", exc)
            self.written = None  # its outcome unknown: kopf writes the final status
        else:
            self.written = body


def _reconciled(
    body: Any,
    patch: Any,
    retry: int,
    model: type[VMDisk] | type[DiskSnapshot],
    status_model: type[S],
    reconcile: Callable[[Any], S],
    written: Callable[[], dict[str, Any] | None] = lambda: None,
) -> None:
    """Parse, reconcile, write status and events; retry (with backoff) only temporary failures.

    A status the object already has, or that the handler itself just published,
    is not written again.
    """
    raw = body.get("status")
    parsed_old = parse_status(raw, status_model)
    old = parsed_old or status_model()
    try:
        # The spec is judged on its own: a malformed status is replaced, not blamed.
        new = reconcile(parse_object(body, model, status_model))
    except ValidationError as exc:
        metadata = body.get("metadata")
        generation = metadata.get("generation") if isinstance(metadata, Mapping) else None
        new = failed_status(old, generation, InvalidSpec("; ".join(describe_errors(exc))))
    wanted = dump(new)
    if parsed_old is None and raw:
        patch.status.update(_clearing(raw, wanted))
    elif wanted != written() and (parsed_old is None or wanted != dump(parsed_old)):
        patch.status.update(wanted)
    _report(body, parsed_old, new)
    ready = _ready(new)
    if ready is not None and ready.status != "True" and new.phase != "Failed":
        raise _retry_later(f"{ready.reason}: {ready.message}", retry, ready.reason)


def register(
    registry: kopf.OperatorRegistry, engine: Engine, *, verify_interval: float = 60.0
) -> None:
    """Register every handler of this node's agent on ``registry``."""
    node = engine.settings.node_name

    def on_this_node(*, spec: Any, **_: Any) -> bool:
        return bool(spec.get("nodeName") == node)

    def disk_on_this_node(*, spec: Any, namespace: Any, **kwargs: Any) -> bool:
        # DiskSnapshots carry no node: they belong to the node of their disk.
        key = snapshot_disk(namespace, spec)
        return key is not None and key in kwargs["node_disks"]

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
        return {(namespace, name): Indexed(body)}

    @kopf.index(GROUP, VERSION, "disksnapshots", id="snapshots", registry=registry)
    def snapshots(*, namespace: Any, name: Any, body: Any, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): Indexed(body)}

    # Who is made from what: a deletion asks for its dependents, not for every object.
    @kopf.index(GROUP, VERSION, "vmdisks", when=on_this_node, id="disk_sources", registry=registry)
    def disk_sources(*, namespace: Any, name: Any, spec: Any, **_: Any) -> dict[Any, Any]:
        return dict.fromkeys(source_keys(namespace, spec), name)

    @kopf.index(GROUP, VERSION, "disksnapshots", id="snapshot_sources", registry=registry)
    def snapshot_sources(*, namespace: Any, name: Any, spec: Any, **_: Any) -> dict[Any, Any]:
        return dict.fromkeys(source_keys(namespace, spec), name)

    @kopf.index(GROUP, VERSION, "vmdiskclasses", id="classes", registry=registry)
    def classes(*, name: Any, body: Any, **_: Any) -> dict[Any, Any]:
        return {name: Indexed(body)}

    reads = LoopReads()

    @kopf.on.startup(id="index_reads", registry=registry)
    async def bind_index_reads(**_: Any) -> None:
        # The loop kopf changes the indexes on; workers read them only through it.
        reads.bind(asyncio.get_running_loop())

    def lookup(kwargs: dict[str, Any]) -> IndexLookup:
        sources = (kwargs["disk_sources"], kwargs["snapshot_sources"])
        return IndexLookup(
            kwargs["node_disks"], kwargs["snapshots"], kwargs["classes"], reads, sources
        )

    @on_changes("vmdisks", on_this_node, "vmdisk_changed")
    def vmdisk_changed(
        *, body: Any, meta: Any, patch: Any, retry: Any, memo: Any, **kw: Any
    ) -> None:
        publish = Publisher(memo, meta)
        _reconciled(
            body,
            patch,
            retry,
            VMDisk,
            VMDiskStatus,
            lambda disk: engine.reconcile_disk(disk, lookup(kw), publish),
            lambda: publish.written,
        )

    @kopf.on.delete(
        GROUP, VERSION, "vmdisks", when=on_this_node, id="vmdisk_deleted", registry=registry
    )
    def vmdisk_deleted(*, body: Any, patch: Any, retry: Any, **kw: Any) -> None:
        try:
            disk = parse_object(body, VMDisk, VMDiskStatus)
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
            raise _retry_later(exc.message, retry, exc.reason) from exc
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
            disk = parse_object(body, VMDisk, VMDiskStatus)
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
            snap = parse_object(body, DiskSnapshot, DiskSnapshotStatus)
        except ValidationError:
            return
        try:
            delete_snapshot(engine, snap, lookup(kw))
        except (HasDependents, DiskInUse) as exc:
            kopf.warn(body, reason=exc.reason, message=exc.message)
            raise _retry_later(exc.message, retry, exc.reason) from exc
