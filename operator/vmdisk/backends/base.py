"""The backend Protocol and the plain data that flows through it.

A backend turns a disk reference plus a request into storage on the host.
Operations a backend cannot do are absent from its type (see
SupportsSnapshots), never silent no-ops.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol, Self, runtime_checkable

from ..api.common import Model
from ..api.vmdisk import Preallocation
from ..config import Settings
from ..layout import StateLayout


class ClassParameters(Model):
    """Base of a backend's ``VMDiskClass.spec.parameters`` model (no parameters).

    Each backend subclasses it with its own fields; ``resolve`` fills in the
    node's defaults and refuses what the node's settings do not allow, so a
    wrong class is refused, never obeyed.
    """

    def resolve(self, settings: Settings) -> Self:
        """These parameters with node defaults filled in; ClassNotAllowed when outside them."""
        return self

    @property
    def placement(self) -> str | None:
        """The backend's container for the disk (an LVM VG, an RBD pool), if it has one."""
        return None


@dataclass(frozen=True)
class DiskRef:
    """Identifies one disk: the VMDisk's namespace and name.

    ``placement`` is the backend's container for it where there is one (the
    RBD pool, the LVM volume group); file backends ignore it.  ``parameters``
    are the disk's resolved class parameters, of the backend's own model.
    """

    namespace: str
    name: str
    placement: str | None = None
    encrypted: bool = False  # the class encrypts: the disk is opened with its key
    # How to place and reach the disk (thin or thick, Ceph identity); not its identity.
    parameters: ClassParameters | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class NetworkHost:
    name: str
    port: int | None = None


@dataclass(frozen=True)
class DiskLocation:
    """Everything libvirt rendering needs to know about where a disk lives."""

    type: Literal["file", "block", "network"]
    path: str  # file path, block device, or "pool/image" for network disks
    format: str  # driver type: raw, qcow2, parallels ...
    fs_driver: Literal["loop", "nbd", "ploop"] | None = None  # <filesystem> driver
    protocol: str | None = None  # network disks: "rbd"
    hosts: tuple[NetworkHost, ...] = ()
    auth_username: str | None = None
    secret_uuid: str | None = None


@dataclass(frozen=True)
class Readable:
    """A disk (or one of its snapshots) as something qemu-img can read."""

    path: Path
    format: str
    snapshot: str | None = None  # qcow2 internal snapshot name


@dataclass(frozen=True)
class BaseImage:
    """A verified cached image a disk is made from."""

    id: str
    path: Path
    format: str
    virtual_size: int
    source_digest: str | None = None  # the registry digest an oci:// reference resolved to


@dataclass(frozen=True)
class Blank:
    filesystem: str | None = None


@dataclass(frozen=True)
class FromImage:
    image: BaseImage

    @property
    def source(self) -> Readable:
        return Readable(self.image.path, self.image.format)

    @property
    def base_id(self) -> str | None:
        return self.image.id


@dataclass(frozen=True)
class FromStore:
    """An image that already lives in the backend's own store (``rbd://fsid/pool/image/snap``).

    Only backends that can clone from their store accept it.
    """

    url: str


@dataclass(frozen=True)
class FromDisk:
    """Copy of another disk or snapshot; ``base`` is the source's cached base, if any."""

    source: Readable
    base: BaseImage | None = None

    @property
    def base_id(self) -> str | None:
        return self.base.id if self.base else None


Content = Blank | FromImage | FromDisk | FromStore


@dataclass(frozen=True)
class CreateRequest:
    size: int
    content: Content
    preallocation: Preallocation = "none"
    progress: Callable[[float], None] | None = None  # percent of a long copy or conversion
    # The key of an encrypted disk (its class's encryption); never printed.
    encryption_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DiskState:
    """What exists on the host for one disk."""

    format: str
    virtual_size: int
    actual_size: int
    base_image: str | None = None
    restored_snapshot: str | None = None  # the last spec.restore applied, pinned
    parent: str | None = None  # copy-on-write parent ("pool/image@snap" for rbd clones)


@dataclass(frozen=True)
class BackendPlugin:
    """Everything the rest of the product knows about one backend.

    The registry is a list of these (``registry.PLUGINS``); the VMDiskClass
    CRD lists their names and merges their parameter models.
    """

    name: str
    parameters: type[ClassParameters]
    # The backend on this node, or None when the node is not configured for it.
    build: Callable[[Settings, StateLayout], DiskBackend | None]
    builtin_class: bool = False  # a built-in VMDiskClass of the same name (file backends)
    shared: bool = False  # disks reachable from every node (a VMDisk may change nodes)


@runtime_checkable
class DiskBackend(Protocol):
    """One storage backend (raw, qcow2, ploop, ...)."""

    name: ClassVar[str]
    shared: ClassVar[bool]  # True when other nodes can open the disk (RBD)
    preallocations: ClassVar[frozenset[str]]

    def location(self, ref: DiskRef) -> DiskLocation:
        """Where the disk is (pure; it may not exist yet)."""
        ...

    def state(self, ref: DiskRef) -> DiskState | None:
        """The disk as it exists on the host, or None when it does not."""
        ...

    def create(self, ref: DiskRef, request: CreateRequest) -> DiskState:
        """Create the disk; on failure nothing half-made remains."""
        ...

    def resize(self, ref: DiskRef, size: int) -> DiskState:
        """Grow the disk to ``size`` bytes; callers refuse shrinking first."""
        ...

    def readable(self, ref: DiskRef, snapshot: str | None = None) -> Readable:
        """The disk (or a snapshot of it) as a qemu-img readable source."""
        ...

    def delete(self, ref: DiskRef) -> None:
        """Remove the disk and its snapshots; missing is fine."""
        ...


@runtime_checkable
class SupportsSnapshots(Protocol):
    """Offline snapshots: create, remove, roll back to, export."""

    def create_snapshot(self, ref: DiskRef, name: str) -> int:
        """Snapshot the disk; returns the snapshot's size in bytes."""
        ...

    def remove_snapshot(self, ref: DiskRef, name: str, *, ignore_missing: bool = False) -> None: ...

    def rollback(self, ref: DiskRef, name: str) -> DiskState:
        """Return the disk to snapshot ``name`` and pin that it was applied."""
        ...

    def snapshots(self, ref: DiskRef) -> tuple[str, ...]: ...


@runtime_checkable
class SupportsDependents(Protocol):
    """Stores where other images can hang off a disk's snapshot (copy-on-write clones)."""

    def snapshot_dependents(self, ref: DiskRef, name: str, export_pool: str | None) -> list[str]:
        """Images that depend on snapshot ``name`` or on its export in ``export_pool``.

        Asked before anything of a snapshot is removed, so that a refused
        deletion leaves the snapshot and its export whole.
        """
        ...


@runtime_checkable
class SupportsInventory(Protocol):
    """Lists the disks that exist in the backend's storage under vmdisk's naming."""

    def inventory(self) -> list[DiskRef]: ...


@runtime_checkable
class SupportsEncryption(Protocol):
    """Disks encrypted at rest; the key comes with each call and is never kept."""

    def unlock(self, ref: DiskRef, key: bytes) -> None:
        """Make the decrypted device at ``location(ref)`` available (idempotent)."""
        ...


@dataclass(frozen=True)
class Capacity:
    """Space in one backend container (an LVM volume group), for metrics and scheduling."""

    placement: str
    size: int
    free: int
    thin_pool_free: int | None = None  # unwritten bytes in the thin pool, if there is one


@runtime_checkable
class SupportsCapacity(Protocol):
    def capacity(self) -> Capacity: ...


@runtime_checkable
class SupportsFlatten(Protocol):
    """Copy-on-write children that can stop depending on their parent (rbd)."""

    def flatten(self, ref: DiskRef) -> DiskState:
        """Copy the parent's data in; afterwards ``state(ref).parent`` is None."""
        ...


@runtime_checkable
class SupportsDirectSnapshot(Protocol):
    """Nova's direct_snapshot: a snapshot published as a standalone image in the store."""

    def direct_snapshot(self, ref: DiskRef, name: str, pool: str) -> str:
        """Clone snapshot ``name`` into ``pool``, flatten it; its ``rbd://`` URL (idempotent)."""
        ...

    def remove_direct_snapshot(self, ref: DiskRef, name: str, pool: str) -> None:
        """Remove what ``direct_snapshot`` made; missing is fine."""
        ...


@runtime_checkable
class SupportsClaim(Protocol):
    """Shared storage: records which node now serves the disk (after a VM moved)."""

    def claim(self, ref: DiskRef) -> None: ...


@runtime_checkable
class Closeable(Protocol):
    """Holds connections to close at process exit."""

    def close(self) -> None: ...


@runtime_checkable
class SupportsHolders(Protocol):
    """Says whether processes other than libvirt's domains have the disk open."""

    def holders(self, ref: DiskRef) -> list[str]:
        """What has the disk open, one description each (QEMU's image lock, RBD watchers)."""
        ...


class PointInTime(Protocol):
    """A running domain's disk, as live snapshots are made of it."""

    def frozen(self) -> AbstractContextManager[None]:
        """The guest's filesystems frozen inside (when its agent answers)."""
        ...

    def copy(self, target: Path, fmt: str) -> None:
        """Have QEMU write a point-in-time copy of the disk into the new file ``target``."""
        ...


@runtime_checkable
class SupportsLiveSnapshot(Protocol):
    """Snapshots taken while a running VM writes, each one point in time (rbd: the
    exclusive-lock owner is asked to take it; raw: QEMU's backup job copies it)."""

    def create_live_snapshot(self, ref: DiskRef, name: str, live: PointInTime) -> int:
        """Snapshot the disk under a running VM; the snapshot's size in bytes."""
        ...


@runtime_checkable
class SupportsOnlineGrow(Protocol):
    """Disks a running QEMU can be told to grow (``virDomainBlockResize``)."""

    def prepare_online_grow(self, ref: DiskRef, size: int) -> None:
        """Make the volume hold ``size`` bytes under a running VM, before QEMU is told.

        Never moves data nor touches a filesystem: the guest owns it now.
        """
        ...
