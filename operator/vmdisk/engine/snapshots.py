"""Reconciling DiskSnapshots: snapshots of a VMDisk, optionally exported.

Offline, unless a domain of the node's libvirtd holds the disk and the
backend's snapshots stay consistent under a writer (rbd); then live, with the
guest's filesystems frozen through its agent when one answers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..api.common import Condition, now_rfc3339
from ..api.snapshot import Consistency, DiskSnapshot, DiskSnapshotStatus
from ..backends.base import (
    DiskBackend,
    DiskRef,
    SupportsDependents,
    SupportsDirectSnapshot,
    SupportsLiveSnapshot,
    SupportsSnapshots,
)
from ..errors import DependencyNotReady, HasDependents, UnsupportedOperation, VMDiskError
from ..host import qemu_img
from ..host.domains import LiveDomain
from ..host.files import host_error, remove_on_error, remove_path
from ..host.locks import file_lock
from ..host.safeopen import ensure_dir
from .inuse import holder, in_use, require_offline
from .ports import Lookup
from .reconcile import Engine
from .status import failed_status, still_creating, with_condition

log = logging.getLogger(__name__)


def _snapshot_backend(
    engine: Engine, snap: DiskSnapshot, lookup: Lookup
) -> tuple[DiskBackend, SupportsSnapshots, DiskRef]:
    namespace, disk_name = snap.metadata.namespace, snap.spec.disk_name
    disk = lookup.get_disk(namespace, disk_name)
    if disk is None or disk.status is None or disk.status.phase != "Ready":
        raise DependencyNotReady(f"spec.diskName: VMDisk {disk_name!r} is not Ready yet")
    assert disk.status.backend is not None
    backend = engine.registry.get(disk.status.backend)
    if not isinstance(backend, SupportsSnapshots):
        raise UnsupportedOperation(f"the {backend.name} backend does not support snapshots")
    return backend, backend, engine.disk_ref(disk, lookup)


def reconcile_snapshot(engine: Engine, snap: DiskSnapshot, lookup: Lookup) -> DiskSnapshotStatus:
    """Make sure the snapshot (and its export) exists; return the new status."""
    status = snap.status or DiskSnapshotStatus()
    generation = snap.metadata.generation
    name = snap.metadata.name
    try:
        backend, snapshots, ref = _snapshot_backend(engine, snap, lookup)
        with file_lock(engine.layout.lock("disk", ref.namespace, ref.name)):
            consistency = status.consistency
            if name in snapshots.snapshots(ref):
                size = snapshots.create_snapshot(ref, name)  # exists: only its size
            else:
                size, consistency = _take(engine, backend, snapshots, ref, name)
            export_path = export_url = None
            if snap.spec.export is not None and snap.spec.export.pool is not None:
                if not isinstance(backend, SupportsDirectSnapshot):
                    raise UnsupportedOperation(
                        f"spec.export.pool: the {backend.name} backend cannot export into "
                        "an RBD pool (only rbd disks can)"
                    )
                export_url = backend.direct_snapshot(ref, name, snap.spec.export.pool)
            elif snap.spec.export is not None:
                fmt = snap.spec.export.format
                target = engine.layout.export_file(ref.namespace, name, fmt)
                if not target.exists():
                    if backend.readable(ref, name).snapshot is not None:
                        # An internal snapshot is read out of the live image file.
                        require_offline(backend, ref, engine.hypervisor, f"exporting {name!r}")
                    _export(backend, ref, name, target, fmt)
                export_path = str(target)
        status = with_condition(
            status,
            Condition(
                type="Ready",
                status="True",
                reason="SnapshotReady",
                message=f"snapshot {name!r} of VMDisk {ref.name!r}",
                observed_generation=generation,
            ),
        )
        return status.model_copy(
            update={
                "phase": "Ready",
                "ready_to_use": True,
                "observed_generation": generation,
                "snapshot_name": name,
                "export_path": export_path,
                "export_url": export_url,
                "size": size,
                "consistency": consistency,
                "creation_time": status.creation_time or now_rfc3339(),
            }
        )
    except VMDiskError as exc:
        log.warning(
            "snapshot %s/%s: %s (%s)", snap.metadata.namespace, name, exc.message, exc.reason
        )
        return failed_status(status, generation, exc)
    except OSError as exc:
        log.exception("snapshot %s/%s: host error", snap.metadata.namespace, name)
        return failed_status(status, generation, host_error(exc))


def _take(
    engine: Engine, backend: DiskBackend, snapshots: SupportsSnapshots, ref: DiskRef, name: str
) -> tuple[int, Consistency]:
    """Take snapshot ``name``: offline, or live under the one domain of this node that holds it.

    Only backends that can take one point in time under a writer go live
    (rbd through librbd, raw through QEMU's backup job); the others wait
    (``DiskInUse``): qemu-img cannot write a qcow2 image QEMU holds, and
    libvirt's disk-only snapshots would move the domain onto a new file.
    """
    found = holder(backend, ref, engine.hypervisor)
    if found is None:
        return snapshots.create_snapshot(ref, name), "Offline"
    if len(found.domains) != 1 or not isinstance(backend, SupportsLiveSnapshot):
        raise in_use(found, ref, f"snapshot {name!r}")
    assert engine.hypervisor is not None
    live = LiveDomain(engine.hypervisor, found.domains[0], engine.settings.command_timeout)
    size = backend.create_live_snapshot(ref, name, live)
    log.info("%s: snapshot %r taken under %s (quiesced: %s)", ref, name, live.disk, live.quiesced)
    return size, "Quiesced" if live.quiesced else "CrashConsistent"


def _export(backend: DiskBackend, ref: DiskRef, name: str, target: Path, fmt: str) -> None:
    """Nova's snapshot_extract: write the snapshot out as a standalone image."""
    ensure_dir(target.parent)
    tmp = target.with_name(f".{target.name}.partial")
    remove_path(tmp)
    source = backend.readable(ref, name)
    with remove_on_error(tmp):
        qemu_img.convert(source.path, source.format, tmp, fmt, snapshot=source.snapshot)
        os.rename(tmp, target)


def delete_snapshot(engine: Engine, snap: DiskSnapshot, lookup: Lookup) -> None:
    """Remove the snapshot and its export, all or nothing.

    Everything that can refuse (disks still being made from it, clones of
    the snapshot or of its export) is asked before anything is removed, so a
    refused deletion leaves a whole, usable snapshot behind.
    """
    namespace, name = snap.metadata.namespace, snap.metadata.name
    users = [
        d.metadata.name
        for d in lookup.disks_from(namespace, "snapshot", name)
        if still_creating(d.status)
    ]
    if users:
        raise HasDependents(
            f"DiskSnapshot {name!r} is still the source of VMDisk(s) being created: "
            f"{', '.join(sorted(users))}"
        )
    export = snap.spec.export
    pool = export.pool if export is not None else None
    disk = lookup.get_disk(namespace, snap.spec.disk_name)
    backend = None
    if disk is not None and disk.status is not None and disk.status.backend is not None:
        backend = engine.registry.get(disk.status.backend)
    if disk is not None and isinstance(backend, SupportsDependents):
        clones = backend.snapshot_dependents(engine.disk_ref(disk, lookup), name, pool)
        if clones:
            raise HasDependents(
                f"DiskSnapshot {name!r} still has clones: {', '.join(clones)}; "
                "flatten them (spec.rbd.flatten: true) or delete them first"
            )
    if disk is not None and isinstance(backend, SupportsSnapshots):
        ref = engine.disk_ref(disk, lookup)
        if name in backend.snapshots(ref) and backend.readable(ref, name).snapshot:
            # Removing an internal snapshot rewrites the live image file.
            require_offline(backend, ref, engine.hypervisor, f"removing snapshot {name!r}")
    if export is not None and pool is None:
        remove_path(engine.layout.export_file(namespace, name, export.format))
    if disk is None or backend is None:
        return  # the disk (and with it the snapshot) is gone
    ref = engine.disk_ref(disk, lookup)
    if pool is not None and isinstance(backend, SupportsDirectSnapshot):
        backend.remove_direct_snapshot(ref, name, pool)
    if isinstance(backend, SupportsSnapshots):
        with file_lock(engine.layout.lock("disk", namespace, snap.spec.disk_name)):
            backend.remove_snapshot(ref, name, ignore_missing=True)
