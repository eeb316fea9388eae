"""The engine: from a resource and the host's state to actions and a new status.

Shared by the kopf operator and local mode.  Every call is idempotent: run it
again with the same spec and it does nothing; interrupt it anywhere and the
next run finishes the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from .api.common import Condition
from .api.snapshot import DiskSnapshot
from .api.vmdisk import VMDisk, VMDiskStatus
from .backends.base import (
    BaseImage,
    Blank,
    ClusterAccess,
    Content,
    CreateRequest,
    DiskBackend,
    DiskRef,
    DiskState,
    FromDisk,
    FromImage,
    FromStore,
    SupportsEncryption,
    SupportsFlatten,
    SupportsInventory,
    SupportsSnapshots,
)
from .backends.rbd_config import RbdSettings
from .backends.record import bases_in_use
from .backends.registry import Registry
from .config import Settings
from .errors import (
    DependencyNotReady,
    DiskMissing,
    HasDependents,
    HostIOError,
    ImageLargerThanDisk,
    InsufficientSpace,
    UnsupportedOperation,
    VMDiskError,
)
from .host.files import raise_if_no_space
from .host.locks import file_lock
from .host.secrets import FileSecrets
from .images.cache import NO_CACHE_OBSERVER, CacheObserver, ImageCache
from .layout import StateLayout
from .libvirt import render_disk
from .planning import Create, Resize, Restore, backend_for, plan_disk
from .status import failed_status, with_condition

log = logging.getLogger(__name__)

Publish = Callable[[VMDiskStatus], None]


class Lookup(Protocol):
    """Read access to the other resources a disk or snapshot depends on."""

    def get_disk(self, namespace: str, name: str) -> VMDisk | None: ...

    def get_snapshot(self, namespace: str, name: str) -> DiskSnapshot | None: ...

    def list_disks(self, namespace: str) -> list[VMDisk]: ...

    def list_snapshots(self, namespace: str) -> list[DiskSnapshot]: ...


class Secrets(Protocol):
    """Reads one key of a Secret: files in local mode, the Kubernetes API in the operator."""

    def get(self, namespace: str, name: str, key: str) -> bytes: ...


class Observer(CacheObserver, Protocol):
    """Told what the engine did (the operator's metrics); the default ignores it."""

    def disk_reconciled(self, backend: str, status: VMDiskStatus, seconds: float) -> None: ...


class _NoObserver:
    def disk_reconciled(self, backend: str, status: VMDiskStatus, seconds: float) -> None:
        pass

    def cache_lookup(self, hit: bool) -> None:
        pass

    def image_fetched(self, scheme: str, size: int, seconds: float) -> None:
        pass


NO_OBSERVER: Observer = _NoObserver()


@dataclass(frozen=True)
class Engine:
    settings: Settings
    layout: StateLayout
    registry: Registry
    cache: ImageCache
    observer: Observer = field(default=NO_OBSERVER)
    secrets: Secrets | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        registry: Registry | None = None,
        observer: Observer | None = None,
        secrets: Secrets | None = None,
    ) -> Engine:
        """Wire the engine from settings (no I/O)."""
        from .backends.registry import default_registry

        layout = StateLayout(settings.state_dir)
        cache = ImageCache(
            layout.cache_dir,
            image_dirs=settings.image_dirs,
            max_virtual_size=settings.max_virtual_size,
            observer=observer or NO_CACHE_OBSERVER,
        )
        return cls(
            settings,
            layout,
            registry
            or default_registry(
                layout, lvm_vg=settings.lvm_vg, rbd=RbdSettings.from_settings(settings)
            ),
            cache,
            observer or NO_OBSERVER,
            secrets or FileSecrets(settings.state_dir / "secrets"),
        )

    @contextmanager
    def _disk_lock(self, namespace: str, name: str) -> Iterator[None]:
        with file_lock(self.layout.lock("disk", namespace, name)):
            yield

    # -- VMDisk -----------------------------------------------------------------
    def reconcile_disk(
        self, disk: VMDisk, lookup: Lookup, publish: Publish | None = None
    ) -> VMDiskStatus:
        """Bring the host in line with ``disk.spec``; return the new status."""
        started = time.monotonic()
        status = self._reconcile_disk(disk, lookup, publish)
        backend = status.backend or self.backend_name(disk)
        self.observer.disk_reconciled(backend, status, time.monotonic() - started)
        return status

    def _reconcile_disk(
        self, disk: VMDisk, lookup: Lookup, publish: Publish | None
    ) -> VMDiskStatus:
        status = disk.status or VMDiskStatus()
        generation = disk.metadata.generation
        ref = self.disk_ref(disk)
        try:
            backend = self.registry.get(
                backend_for(disk.spec, disk.status, self.settings.default_backend)
            )
            key = self._encryption_key(disk, backend)
            with self._disk_lock(ref.namespace, ref.name):
                host = backend.state(ref)
                if key is not None and host is not None:
                    assert isinstance(backend, SupportsEncryption)
                    backend.unlock(ref, key)  # after a reboot; resize needs it open
                actions = plan_disk(disk.spec, disk.status, host)
                for action in actions:
                    status = self._progressing(status, generation, action, publish)
                    if isinstance(action, Create):
                        host = self._create(disk, ref, backend, lookup, status, publish)
                    elif isinstance(action, Restore):
                        host = self._restore(ref, backend, action.snapshot)
                    elif isinstance(action, Resize):
                        assert host is not None
                        if host.virtual_size < action.size:
                            host = backend.resize(ref, action.size)
                assert host is not None
                if key is not None:
                    assert isinstance(backend, SupportsEncryption)
                    backend.unlock(ref, key)  # a rollback closes the mapping
                # spec.rbd.flatten: a clone stops depending on its parent (once).
                flatten = disk.spec.rbd is not None and disk.spec.rbd.flatten
                flattened = flatten and host.parent is not None
                if flattened:
                    if not isinstance(backend, SupportsFlatten):
                        raise UnsupportedOperation(f"the {backend.name} backend cannot flatten")
                    host = backend.flatten(ref)
            return self._ready(disk, backend, ref, host, status, changed=bool(actions) or flattened)
        except VMDiskError as exc:
            log.warning("%s: %s (%s)", ref, exc.message, exc.reason)
            return failed_status(status, generation, exc)
        except OSError as exc:
            log.exception("%s: host error", ref)
            return failed_status(status, generation, host_error(exc))

    def _progressing(
        self, status: VMDiskStatus, generation: int | None, action: object, publish: Publish | None
    ) -> VMDiskStatus:
        verb = type(action).__name__
        status = with_condition(
            status,
            Condition(
                type="Progressing",
                status="True",
                reason=f"{verb}InProgress",
                message=f"{verb.lower()} in progress",
                observed_generation=generation,
            ),
        )
        if status.phase != "Ready":
            status = status.model_copy(update={"phase": "Provisioning", "progress": "0%"})
        if publish is not None:
            publish(status)
        return status

    def _create(
        self,
        disk: VMDisk,
        ref: DiskRef,
        backend: DiskBackend,
        lookup: Lookup,
        status: VMDiskStatus,
        publish: Publish | None,
    ) -> DiskState:
        spec = disk.spec
        progress = _ProgressPublisher(status, publish)
        content: Content
        size = spec.size_bytes
        source = spec.source
        if source.image is not None and source.image.url.startswith("rbd://"):
            # Already in the backend's store: the backend clones it (and checks its size).
            content, minimum = FromStore(source.image.url), 0
        elif source.image is not None:
            image = self.cache.get(source.image, disk_size=size, progress=progress.download)
            content, minimum = FromImage(image), image.virtual_size
        elif source.blank is not None:
            content, minimum = Blank(source.blank.filesystem), 0
        else:
            content, minimum = self._copy_source(disk, lookup)
        if size is None:
            size = minimum
        elif size < minimum:
            raise ImageLargerThanDisk(
                f"spec.size: {spec.size} is smaller than the source's {minimum} bytes"
            )
        request = CreateRequest(
            size=size,
            content=content,
            preallocation=spec.preallocation,
            progress=progress.percent,
            sparse=spec.lvm.sparse if spec.lvm else False,
            encryption_key=self._encryption_key(disk, backend),
        )
        if isinstance(content, FromDisk):
            # Hold the source still while it is copied.
            owner = spec.source.disk.name if spec.source.disk else self._snapshot_disk(disk, lookup)
            with file_lock(self.layout.lock("disk", ref.namespace, owner), timeout=600):
                return backend.create(ref, request)
        return backend.create(ref, request)

    def _snapshot_disk(self, disk: VMDisk, lookup: Lookup) -> str:
        assert disk.spec.source.snapshot is not None
        snap = lookup.get_snapshot(disk.metadata.namespace, disk.spec.source.snapshot.name)
        assert snap is not None
        return snap.spec.disk_name

    def _copy_source(self, disk: VMDisk, lookup: Lookup) -> tuple[FromDisk, int]:
        """Resolve ``source.disk`` or ``source.snapshot`` to something to copy."""
        namespace = disk.metadata.namespace
        snapshot_name: str | None = None
        if disk.spec.source.disk is not None:
            source_name = disk.spec.source.disk.name
        else:
            assert disk.spec.source.snapshot is not None
            snap = lookup.get_snapshot(namespace, disk.spec.source.snapshot.name)
            if snap is None or snap.status is None or not snap.status.ready_to_use:
                raise DependencyNotReady(
                    f"spec.source.snapshot: DiskSnapshot {disk.spec.source.snapshot.name!r} "
                    "is not ready to use yet"
                )
            source_name, snapshot_name = snap.spec.disk_name, snap.status.snapshot_name
        source = lookup.get_disk(namespace, source_name)
        if source is None or source.status is None or source.status.phase != "Ready":
            raise DependencyNotReady(f"source VMDisk {source_name!r} is not Ready yet")
        assert source.status.backend is not None
        backend = self.registry.get(source.status.backend)
        source_ref = self.disk_ref(source)
        state = backend.state(source_ref)
        if state is None:
            raise DependencyNotReady(f"source VMDisk {source_name!r} has no data on this node")
        base: BaseImage | None = None
        if state.base_image is not None:
            base = self.cache.lookup(state.base_image)
        readable = backend.readable(source_ref, snapshot_name)
        return FromDisk(readable, base), state.virtual_size

    def _restore(self, ref: DiskRef, backend: DiskBackend, snapshot: str) -> DiskState:
        if not isinstance(backend, SupportsSnapshots):
            raise UnsupportedOperation(f"the {backend.name} backend cannot restore snapshots")
        return backend.rollback(ref, snapshot)

    def _ready(
        self,
        disk: VMDisk,
        backend: DiskBackend,
        ref: DiskRef,
        host: DiskState,
        status: VMDiskStatus,
        *,
        changed: bool,
    ) -> VMDiskStatus:
        location = backend.location(ref)
        generation = disk.metadata.generation
        status = with_condition(
            status,
            Condition(
                type="Ready",
                status="True",
                reason="Provisioned",
                message=f"{backend.name} disk of {host.virtual_size} bytes at {location.path}",
                observed_generation=generation,
            ),
            drop="Progressing",
        )
        if changed:
            log.info("%s: ready (%s, %d bytes)", ref, backend.name, host.virtual_size)
        return status.model_copy(
            update={
                "phase": "Ready",
                "observed_generation": generation,
                "node_name": disk.spec.node_name or self.settings.node_name,
                "backend": backend.name,
                "format": host.format,
                "path": (
                    f"{location.protocol}:{location.path}"
                    if location.type == "network"
                    else location.path
                ),
                "virtual_size": host.virtual_size,
                "actual_size": host.actual_size,
                "base_image": host.base_image,
                "progress": "100%",
                "libvirt_xml": render_disk(location, disk.spec.libvirt),
                "shared": backend.shared,
                "restored_snapshot": host.restored_snapshot,
                "parent": host.parent,
            }
        )

    def delete_disk(self, disk: VMDisk, lookup: Lookup) -> None:
        """Remove the disk's data per ``deletionPolicy``; refuse while others depend on it."""
        namespace, name = disk.metadata.namespace, disk.metadata.name
        dependents = [
            f"DiskSnapshot/{s.metadata.name}"
            for s in lookup.list_snapshots(namespace)
            if s.spec.disk_name == name
        ]
        dependents += [
            f"VMDisk/{d.metadata.name}"
            for d in lookup.list_disks(namespace)
            if d.spec.source.disk is not None
            and d.spec.source.disk.name == name
            and (d.status is None or d.status.phase != "Ready")
        ]
        if dependents:
            raise HasDependents(
                f"VMDisk {name!r} still has dependents: {', '.join(sorted(dependents))}; "
                "delete them first"
            )
        if disk.spec.deletion_policy == "Retain":
            log.info("%s/%s: deletionPolicy Retain, keeping the data", namespace, name)
            return
        backend_name = self.backend_name(disk)
        with self._disk_lock(namespace, name):
            self.registry.get(backend_name).delete(self.disk_ref(disk))

    def cache_in_use(self) -> set[str]:
        """Cache entries that existing disks still read from (qcow2 backing files)."""
        return bases_in_use(self.layout.disks_dir)

    def verify_disk(self, disk: VMDisk) -> VMDiskStatus | None:
        """Compare a Ready disk with the host; a new status when they disagree, else None.

        Never changes data: a vanished disk turns Failed with DiskMissing.
        """
        status = disk.status
        if status is None or status.phase != "Ready" or status.backend is None:
            return None
        ref = self.disk_ref(disk)
        try:
            with self._disk_lock(ref.namespace, ref.name):
                state = self.registry.get(status.backend).state(ref)
        except OSError as exc:
            return failed_status(status, disk.metadata.generation, host_error(exc))
        if state is None:
            return failed_status(
                status,
                disk.metadata.generation,
                DiskMissing(f"the disk's data at {status.path} no longer exists on this node"),
            )
        if (state.virtual_size, state.actual_size) != (status.virtual_size, status.actual_size):
            return status.model_copy(
                update={"virtual_size": state.virtual_size, "actual_size": state.actual_size}
            )
        return None

    def host_disks(self) -> set[DiskRef]:
        """Every disk that exists in this node's storage under our naming."""
        found: set[DiskRef] = set()
        for backend in self.registry.backends.values():
            if isinstance(backend, SupportsInventory):
                found.update(backend.inventory())
        return found

    def backend_name(self, disk: VMDisk) -> str:
        """The disk's backend: pinned in status once created, else the spec's or the default."""
        status = disk.status
        if status is not None and status.format is not None and status.backend is not None:
            return status.backend
        return disk.spec.backend or self.settings.default_backend

    def disk_ref(self, disk: VMDisk) -> DiskRef:
        """The backend reference of a VMDisk, with its pool or volume group."""
        spec = disk.spec
        backend = self.backend_name(disk)
        placement = None
        if backend == "rbd":
            placement = (spec.rbd.pool if spec.rbd else None) or self.settings.rbd_pool
        elif backend == "lvm":
            placement = (spec.lvm.volume_group if spec.lvm else None) or self.settings.lvm_vg
        access = None
        if backend == "rbd" and spec.rbd is not None:
            access = ClusterAccess(spec.rbd.ceph_conf, spec.rbd.user, spec.rbd.secret_uuid)
        return DiskRef(
            disk.metadata.namespace,
            disk.metadata.name,
            placement,
            spec.encryption is not None,
            access,
        )

    def _encryption_key(self, disk: VMDisk, backend: DiskBackend) -> bytes | None:
        """The disk's key from its Secret, or None when it is not encrypted."""
        encryption = disk.spec.encryption
        if encryption is None:
            return None
        if not isinstance(backend, SupportsEncryption):
            raise UnsupportedOperation(
                f"spec.encryption: the {backend.name} backend cannot encrypt disks (use lvm)"
            )
        if self.secrets is None:
            raise UnsupportedOperation("spec.encryption: no Secret reader is configured")
        ref = encryption.secret_ref
        return self.secrets.get(disk.metadata.namespace, ref.name, ref.key)


def host_error(exc: OSError) -> VMDiskError:
    """An OSError as a typed error: full disks are InsufficientSpace, the rest HostIOError."""
    try:
        raise_if_no_space(exc)
    except InsufficientSpace as typed:
        return typed
    return HostIOError(f"{exc.strerror or exc} ({exc.filename or 'no file'})")


class _ProgressPublisher:
    """Throttled progress: publishes ``status.progress`` at most every two seconds."""

    def __init__(self, status: VMDiskStatus, publish: Publish | None) -> None:
        self.status = status
        self.publish = publish
        self.last = 0.0

    def percent(self, value: float) -> None:
        now = time.monotonic()
        if self.publish is None or (now - self.last < 2.0 and value < 100):
            return
        self.last = now
        self.publish(self.status.model_copy(update={"progress": f"{int(value)}%"}))

    def download(self, done: int, total: int | None) -> None:
        self.percent(done * 100 / total if total else 0.0)
