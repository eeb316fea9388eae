"""The engine: from a resource and the host's state to actions and a new status.

Shared by the kopf operator and local mode.  Every call is idempotent: run it
again with the same spec and it does nothing; interrupt it anywhere and the
next run finishes the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..api.common import Condition
from ..api.vmdisk import LibvirtSpec, VMDisk, VMDiskStatus
from ..backends.base import (
    Closeable,
    CreateRequest,
    DiskBackend,
    DiskRef,
    DiskState,
    SupportsClaim,
    SupportsEncryption,
    SupportsFlatten,
    SupportsInventory,
    SupportsOnlineGrow,
    SupportsSnapshots,
)
from ..backends.registry import Registry, default_registry
from ..config import Settings
from ..errors import (
    ChangeRefused,
    DiskInUse,
    DiskMissing,
    HasDependents,
    ImageLargerThanDisk,
    InvalidSpec,
    UnsupportedOperation,
    VMDiskError,
)
from ..host.domains import Hypervisor
from ..host.files import host_error
from ..host.locks import file_lock
from ..host.secrets import FileSecrets
from ..images.cache import ImageCache
from ..images.entries import NO_CACHE_OBSERVER
from ..images.fetchbounds import FetchLimits
from ..images.policy import default_policy
from ..layout import StateLayout
from ..libvirt import check_device, container_filesystem, render_disk
from .classes import ResolvedClass, resolve_class
from .inuse import holder, require_offline
from .limits import check_size, effective_iotune
from .planning import Create, Resize, Restore, plan_disk
from .ports import NO_OBSERVER, Lookup, Observer, Publish, Secrets
from .sources import resolve_source
from .status import (
    ProgressPublisher,
    failed_status,
    refused_status,
    still_creating,
    with_condition,
)

if TYPE_CHECKING:
    from ..images.registry import RegistryAuth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    settings: Settings
    layout: StateLayout
    registry: Registry
    cache: ImageCache
    observer: Observer = field(default=NO_OBSERVER)
    secrets: Secrets | None = None
    hypervisor: Hypervisor | None = None  # the node's libvirtd (settings.libvirt_uri)

    @classmethod
    def build(
        cls,
        settings: Settings,
        registry: Registry | None = None,
        observer: Observer | None = None,
        secrets: Secrets | None = None,
    ) -> Engine:
        """Wire the engine from settings (no I/O)."""
        layout = StateLayout(settings.state_dir)
        cache = ImageCache(
            layout.cache_dir,
            policy=default_policy(settings),
            max_virtual_size=settings.max_virtual_size,
            limits=FetchLimits.from_settings(settings),
            cluster_cidrs=settings.cluster_cidrs,
            observer=observer or NO_CACHE_OBSERVER,
        )
        return cls(
            settings,
            layout,
            registry or default_registry(settings, layout),
            cache,
            observer or NO_OBSERVER,
            secrets or FileSecrets(settings.state_dir / "secrets"),
            Hypervisor(settings.libvirt_uri) if settings.libvirt_uri else None,
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
        ref = DiskRef(disk.metadata.namespace, disk.metadata.name)
        host: DiskState | None = None
        try:
            self._check_size(disk)
            with self._disk_lock(ref.namespace, ref.name):
                # Decided under the lock, from the freshest status: a process that
                # just created the disk published it (and its class) before letting go.
                pinned = self._fresh_status(disk, lookup)
                klass = self.resolve_class(disk.model_copy(update={"status": pinned}), lookup)
                ref = klass.ref(disk)
                backend = self.registry.get(klass.backend)
                key = self._encryption_key(klass, backend)
                iotune = effective_iotune(
                    disk.spec.libvirt.iotune, klass.limits, class_name=klass.name
                )
                libvirt = disk.spec.libvirt.model_copy(update={"iotune": iotune})
                # Before any data is made: a disk no VM can start never goes Ready.
                check_device(backend.location(ref), libvirt)
                host = backend.state(ref)
                if key is not None and host is not None:
                    assert isinstance(backend, SupportsEncryption)
                    backend.unlock(ref, key)  # after a reboot; resize needs it open
                actions = plan_disk(disk.spec, pinned, host)
                online: bool | None = None
                for action in actions:
                    if isinstance(action, Resize):
                        check_size(klass.limits, action.size, class_name=klass.name)
                    status = self._progressing(status, generation, action, klass, publish)
                    if isinstance(action, Create):
                        host, digest = self._create(
                            disk, ref, klass, backend, key, lookup, status, publish
                        )
                        status = status.model_copy(update={"image_digest": digest})
                    elif isinstance(action, Restore):
                        host = self._restore(ref, backend, action.snapshot)
                    elif isinstance(action, Resize):
                        assert host is not None
                        if host.virtual_size < action.size:
                            host, online = self._grow(ref, backend, action.size)
                assert host is not None
                if key is not None:
                    assert isinstance(backend, SupportsEncryption)
                    backend.unlock(ref, key)  # a rollback closes the mapping
                if backend.shared and isinstance(backend, SupportsClaim):
                    backend.claim(ref)  # a VM moved here: this node now serves the disk
                # spec.rbd.flatten: a clone stops depending on its parent (once).
                flatten = disk.spec.rbd is not None and disk.spec.rbd.flatten
                flattened = flatten and host.parent is not None
                if flattened:
                    if not isinstance(backend, SupportsFlatten):
                        raise UnsupportedOperation(f"the {backend.name} backend cannot flatten")
                    host = backend.flatten(ref)
                if online is not None:
                    status = status.model_copy(update={"resized_online": online})
                changed = bool(actions) or flattened
                result = self._ready(disk, backend, ref, host, status, libvirt, changed=changed)
                if changed and publish is not None:
                    publish(result)  # before the lock goes: the next holder sees the backend
            return result
        except ChangeRefused as exc:
            log.warning("%s: change refused: %s (%s)", ref, exc.message, exc.reason)
            if status.phase == "Ready":
                return refused_status(status, generation, exc)
            return failed_status(self._unpinned(status, host), generation, exc)
        except VMDiskError as exc:
            log.warning("%s: %s (%s)", ref, exc.message, exc.reason)
            return failed_status(self._unpinned(status, host), generation, exc)
        except OSError as exc:
            log.exception("%s: host error", ref)
            return failed_status(self._unpinned(status, host), generation, host_error(exc))

    @staticmethod
    def _unpinned(status: VMDiskStatus, host: DiskState | None) -> VMDiskStatus:
        """A disk that never came to exist keeps no class pin: a fixed class applies next time.

        (A crash mid-create leaves the pin, so the next run finishes or cleans
        up in the same place.)
        """
        if host is None and status.format is None:
            return status.model_copy(update={"pinned_class": None})
        return status

    @staticmethod
    def _fresh_status(disk: VMDisk, lookup: Lookup) -> VMDiskStatus | None:
        """The stored status of this very object (same uid), else the one we were given."""
        fresh = lookup.get_disk(disk.metadata.namespace, disk.metadata.name)
        if fresh is not None and fresh.metadata.uid == disk.metadata.uid and fresh.status:
            return fresh.status
        return disk.status

    def _check_size(self, disk: VMDisk) -> None:
        size = disk.spec.size_bytes
        ceiling = self.settings.max_virtual_size
        if size is not None and size > ceiling:
            raise InvalidSpec(
                f"spec.size: {disk.spec.size} ({size} bytes) is over this node's maximum "
                f"disk size of {ceiling} bytes"
            )

    def _progressing(
        self,
        status: VMDiskStatus,
        generation: int | None,
        action: object,
        klass: ResolvedClass,
        publish: Publish | None,
    ) -> VMDiskStatus:
        verb = type(action).__name__
        if status.pinned_class is None:
            # Pinned before anything is made: an interrupted create resumes in place.
            status = status.model_copy(
                update={"pinned_class": klass.pin(), "backend": klass.backend}
            )
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
        klass: ResolvedClass,
        backend: DiskBackend,
        key: bytes | None,
        lookup: Lookup,
        status: VMDiskStatus,
        publish: Publish | None,
    ) -> tuple[DiskState, str | None]:
        """The new disk's state, and the registry digest its image was pulled as."""
        spec = disk.spec
        if spec.size_bytes is not None:
            check_size(klass.limits, spec.size_bytes, class_name=klass.name)
        progress = ProgressPublisher(status, publish)
        source = resolve_source(
            disk,
            lookup,
            cache=self.cache,
            registry=self.registry,
            ref_of=lambda d: self.disk_ref(d, lookup),
            policy=klass.sources,
            progress=progress.download,
            registry_auth=lambda: self._registry_auth(klass),
        )
        size = spec.size_bytes
        if size is None:
            size = source.minimum
            check_size(klass.limits, size, class_name=klass.name)
        elif size < source.minimum:
            raise ImageLargerThanDisk(
                f"spec.size: {spec.size} is smaller than the source's {source.minimum} bytes"
            )
        request = CreateRequest(
            size=size,
            content=source.content,
            preallocation=spec.preallocation,
            progress=progress.percent,
            encryption_key=key,
        )
        if source.live is not None:
            # A copy of a disk a VM is writing would be torn: wait until it stops.
            require_offline(*source.live, self.hypervisor, f"copying it into {ref}")
        if source.holds is not None:
            # Hold the source disk still while it is copied.
            with file_lock(self.layout.lock("disk", ref.namespace, source.holds), timeout=600):
                return backend.create(ref, request), source.image_digest
        return backend.create(ref, request), source.image_digest

    def _restore(self, ref: DiskRef, backend: DiskBackend, snapshot: str) -> DiskState:
        if not isinstance(backend, SupportsSnapshots):
            raise UnsupportedOperation(f"the {backend.name} backend cannot restore snapshots")
        # Replacing data under a running VM: the guest would never see it, and
        # its next writes would be lost (or corrupt the restored image).
        require_offline(backend, ref, self.hypervisor, f"restoring snapshot {snapshot!r}")
        return backend.rollback(ref, snapshot)

    def _grow(self, ref: DiskRef, backend: DiskBackend, size: int) -> tuple[DiskState, bool]:
        """Grow offline, or online through libvirt when a domain of this node holds the disk.

        The new state, and whether the grow went online.
        """
        found = holder(backend, ref, self.hypervisor)
        if found is None:
            return backend.resize(ref, size), False
        if len(found.domains) != 1:
            raise DiskInUse(
                f"disk {ref} is in use by {found.description}; it can only grow online when "
                "it is attached to exactly one domain of the node's libvirtd "
                f"({self.settings.libvirt_uri or 'none configured'}), else once it is released"
            )
        if not isinstance(backend, SupportsOnlineGrow):
            raise DiskInUse(
                f"disk {ref} is in use by {found.description}, and {backend.name} disks cannot "
                "grow under a running VM (QEMU cannot resize the format); the grow waits "
                "until the domain stops"
            )
        assert self.hypervisor is not None
        domain = found.domains[0]
        backend.prepare_online_grow(ref, size)
        self.hypervisor.block_resize(domain, size)  # QEMU and the guest see it at once
        log.info("%s: grown online to %d bytes through %s", ref, size, domain)
        state = backend.state(ref)
        if state is None:
            raise DiskMissing(f"disk {ref} vanished while it was grown online")
        return state, True

    def _ready(
        self,
        disk: VMDisk,
        backend: DiskBackend,
        ref: DiskRef,
        host: DiskState,
        status: VMDiskStatus,
        libvirt: LibvirtSpec,
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
            drop=("Progressing", "ChangeRefused"),
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
                "libvirt_xml": render_disk(location, libvirt),
                "libvirt_filesystem_xml": container_filesystem(location),
                "shared": backend.shared,
                "restored_snapshot": host.restored_snapshot,
                "parent": host.parent,
            }
        )

    def delete_disk(self, disk: VMDisk, lookup: Lookup) -> str:
        """Remove the disk's data per ``deletionPolicy``; refuse while others depend on it.

        Returns what happened to the data, for the user (the Deleted event).
        """
        namespace, name = disk.metadata.namespace, disk.metadata.name
        dependents = [
            f"DiskSnapshot/{s.metadata.name}" for s in lookup.snapshots_of(namespace, name)
        ]
        dependents += [
            f"VMDisk/{d.metadata.name}"
            for d in lookup.disks_from(namespace, "disk", name)
            if still_creating(d.status)
        ]
        if dependents:
            raise HasDependents(
                f"VMDisk {name!r} still has dependents: {', '.join(sorted(dependents))}; "
                "delete them first"
            )
        where = (disk.status.path if disk.status else None) or "the node"
        if disk.spec.deletion_policy == "Retain":
            log.info("%s/%s: deletionPolicy Retain, keeping the data", namespace, name)
            return f"disk data kept at {where} (deletionPolicy: Retain)"
        status = disk.status
        if status is None or (status.pinned_class is None and status.format is None):
            # Never pinned to a class nor made (a create pins first): nothing to remove.
            return f"no disk data was made at {where}"
        klass = self.resolve_class(disk, lookup)
        backend, ref = self.registry.get(klass.backend), klass.ref(disk)
        with self._disk_lock(namespace, name):
            require_offline(backend, ref, self.hypervisor, "deletion")
            backend.delete(ref)
        return f"disk data removed from {where} (deletionPolicy: Delete)"

    def close(self) -> None:
        """Close the backends' connections (at process exit)."""
        for backend in self.registry.backends.values():
            if isinstance(backend, Closeable):
                backend.close()
        if self.hypervisor is not None:
            self.hypervisor.close()

    def verify_disk(self, disk: VMDisk) -> VMDiskStatus | None:
        """Compare a Ready disk with the host; a new status when they disagree, else None.

        Never changes data: a vanished disk turns Failed with DiskMissing.  A
        status of an older generation is left alone: a reconcile of the new
        spec owns it (the agent's verify timer may hold a body from before
        that reconcile published, and would otherwise write the old status back).
        """
        status = disk.status
        if status is None or status.phase != "Ready" or status.backend is None:
            return None
        if status.observed_generation != disk.metadata.generation:
            return None
        try:
            ref = self.disk_ref(disk)
            with self._disk_lock(ref.namespace, ref.name):
                state = self.registry.get(status.backend).state(ref)
        except VMDiskError as exc:
            return failed_status(status, disk.metadata.generation, exc)
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
        """The disk's backend as far as known without a lookup (for metrics and logs)."""
        status = disk.status
        return (status.backend if status else None) or disk.spec.backend or "unknown"

    def resolve_class(self, disk: VMDisk, lookup: Lookup | None = None) -> ResolvedClass:
        """The disk's class on this node: pinned once created, else looked up now."""
        return resolve_class(disk, lookup, self.registry, self.settings)

    def disk_ref(self, disk: VMDisk, lookup: Lookup | None = None) -> DiskRef:
        """The backend reference of a VMDisk, with its class's placement and parameters."""
        return self.resolve_class(disk, lookup).ref(disk)

    def _registry_auth(self, klass: ResolvedClass) -> RegistryAuth | None:
        """The class's registry credentials (a dockerconfigjson Secret in the agent's namespace)."""
        name = klass.sources.registry_credentials
        if name is None:
            return None
        if self.secrets is None:
            raise UnsupportedOperation("registryCredentialsRef: no Secret reader is configured")
        from ..images.registry import DOCKER_CONFIG_KEY, RegistryAuth  # oci:// sources only

        config = self.secrets.get(self.settings.namespace, name, DOCKER_CONFIG_KEY)
        return RegistryAuth(f"{self.settings.namespace}/{name}", config)

    def _encryption_key(self, klass: ResolvedClass, backend: DiskBackend) -> bytes | None:
        """The key of the class's Secret (in the agent's namespace), or None."""
        if klass.key_ref is None:
            return None
        if not isinstance(backend, SupportsEncryption):
            raise UnsupportedOperation(
                f"VMDiskClass {klass.name!r}: the {backend.name} backend cannot encrypt disks "
                "(use lvm)"
            )
        if self.secrets is None:
            raise UnsupportedOperation("encryption: no Secret reader is configured")
        ref = klass.key_ref
        return self.secrets.get(self.settings.namespace, ref.name, ref.key)
