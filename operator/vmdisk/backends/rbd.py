"""The rbd backend: disks as Ceph RBD images, shared by every node of the cluster.

* Images are ``vmdisk_<namespace>_<name>`` in the disk's pool (``rbd_names``).
* An image is finished only when it carries ``vmdisk.complete=<pool>/<image>``
  (its own name) in its metadata, written last: a clone that inherited its
  parent's marker (librbd copies image-meta) is never taken for finished.
  Any failure removes the half-made image; should that removal fail too (the
  cluster is away, the process was killed), the unfinished image is
  invisible to ``state()`` and the next attempt removes it first, even when
  it is too broken to open.
* Provisioning: a copy-on-write clone for ``rbd://fsid/pool/image/snap``
  sources in this cluster (Glance's layout), otherwise ``qemu-img convert``
  of the cached, checked image straight into the new image (one pass, any
  source format, zero blocks never written, no scratch copy on the node).
* Snapshots are RBD snapshots, protected so that clones (direct snapshots,
  other disks) can be made of them; the applied ``spec.restore`` is pinned
  in the image's metadata so it is applied once.
* Every librados/librbd call goes through ``host.ceph`` (timeouts, typed
  errors); connections are made per (conf, user) on first use and reused.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote, urlsplit

from ..errors import (
    ClassNotAllowed,
    ImageError,
    ImageLargerThanDisk,
    InvalidSpec,
    PermanentError,
    UnsupportedOperation,
    VMDiskError,
)
from ..host.ceph import CephAccess, CephNotFound
from ..host.files import remove_path
from ..host.mkfs import make_filesystem
from ..host.rbd_images import Cluster, ImageFacts, SnapshotSpec
from ..layout import StateLayout
from .base import (
    Blank,
    Capacity,
    CreateRequest,
    DiskLocation,
    DiskRef,
    DiskState,
    FromDisk,
    FromImage,
    FromStore,
    NetworkHost,
    PointInTime,
    Readable,
)
from .copysnap import SnapshotMissing
from .rbd_config import RbdParameters, RbdSettings, parse_mon_host
from .rbd_names import disk_image, export_image, parse_disk_image

COMPLETE = "vmdisk.complete"
DISK = "vmdisk.disk"
NODE = "vmdisk.node"
BASE_IMAGE = "vmdisk.base-image"
RESTORED = "vmdisk.restored-snapshot"
EXPORT_SNAPSHOT = "snap"  # the snapshot a direct snapshot publishes (Nova's name)


class SourceNotInCluster(ImageError):
    reason = "SourceNotInCluster"


class SourceSnapshotMissing(ImageError):
    reason = "SourceSnapshotMissing"


@dataclass(frozen=True)
class StoreUrl:
    """``rbd://<fsid>/<pool>/<image>/<snapshot>``, each part URL-quoted."""

    fsid: str
    parent: SnapshotSpec

    @classmethod
    def parse(cls, url: str) -> StoreUrl:
        parts = urlsplit(url)
        pieces = [unquote(p) for p in parts.path.split("/")[1:]]
        if parts.scheme != "rbd" or not parts.netloc or len(pieces) != 3 or not all(pieces):
            raise InvalidSpec(
                f"spec.source.image.url: {url!r} is not rbd://<fsid>/<pool>/<image>/<snapshot>"
            )
        return cls(unquote(parts.netloc), SnapshotSpec(*pieces))

    def __str__(self) -> str:
        p = self.parent
        parts = (self.fsid, p.pool, p.image, p.snapshot)
        return "rbd://" + "/".join(quote(x, safe="") for x in parts)


class RbdBackend:
    name: ClassVar[str] = "rbd"
    shared: ClassVar[bool] = True
    preallocations: ClassVar[frozenset[str]] = frozenset({"none"})  # RBD is thin

    def __init__(self, settings: RbdSettings, layout: StateLayout) -> None:
        self.settings = settings
        self.layout = layout
        self._clusters: dict[CephAccess, Cluster] = {}
        self._hosts: dict[CephAccess, tuple[NetworkHost, ...]] = {}
        self._lock = threading.Lock()

    # -- wiring ----------------------------------------------------------------------
    def _params(self, ref: DiskRef) -> RbdParameters:
        params = ref.parameters if isinstance(ref.parameters, RbdParameters) else RbdParameters()
        # The engine resolved the class against the same settings; refusing
        # here too keeps a foreign ceph.conf or identity from ever being used.
        conf = params.ceph_conf or (str(c) if (c := self.settings.ceph_conf) else None)
        user = params.user or self.settings.user
        if conf is not None and conf not in {str(c) for c in self.settings.ceph_confs}:
            raise ClassNotAllowed(f"disk {ref}: ceph.conf {conf} is not allowed on this node")
        if user is not None and user not in self.settings.users:
            raise ClassNotAllowed(f"disk {ref}: Ceph user {user!r} is not allowed on this node")
        return params.model_copy(update={"ceph_conf": conf, "user": user})

    def _access(self, ref: DiskRef) -> CephAccess:
        params = self._params(ref)
        return CephAccess(
            conf=Path(params.ceph_conf) if params.ceph_conf else None,
            user=params.user,
            keyring=self.settings.keyring,
            op_timeout=self.settings.op_timeout,
            long_timeout=self.settings.command_timeout,
        )

    def cluster(self, ref: DiskRef) -> Cluster:
        access = self._access(ref)
        with self._lock:
            if access not in self._clusters:
                self._clusters[access] = Cluster(access)
            return self._clusters[access]

    def close(self) -> None:
        """Shut every connection down (at process exit)."""
        with self._lock:
            clusters, self._clusters = list(self._clusters.values()), {}
        for cluster in clusters:
            cluster.close()

    def _pool(self, ref: DiskRef) -> str:
        pool = ref.placement or self.settings.pool
        if not pool:
            raise InvalidSpec(
                "spec.parameters.pool: the class names no RBD pool and the node has no default "
                "(VMDISK_RBD_POOL)"
            )
        if self.settings.pools and pool not in self.settings.pools:
            raise ClassNotAllowed(f"disk {ref}: RBD pool {pool!r} is not allowed on this node")
        return pool

    @staticmethod
    def image(ref: DiskRef) -> str:
        return disk_image(ref.namespace, ref.name)

    # -- DiskBackend -----------------------------------------------------------------
    def location(self, ref: DiskRef) -> DiskLocation:
        access = self._access(ref)
        with self._lock:
            hosts = self._hosts.get(access)
        if hosts is None:
            hosts = parse_mon_host(self.cluster(ref).mon_host())
            with self._lock:
                self._hosts[access] = hosts
        secret = self._params(ref).secret_uuid
        return DiskLocation(
            type="network",
            protocol="rbd",
            path=f"{self._pool(ref)}/{self.image(ref)}",
            format="raw",
            hosts=hosts,
            auth_username=access.user,
            secret_uuid=secret or self.settings.secret_uuid,
        )

    def state(self, ref: DiskRef) -> DiskState | None:
        pool, image = self._pool(ref), self.image(ref)
        facts = self.cluster(ref).facts(pool, image)
        if not _complete(facts, pool, image):
            return None  # absent, or half-made (the next create removes it)
        assert facts is not None
        return _state(facts)

    def create(self, ref: DiskRef, request: CreateRequest) -> DiskState:
        if ref.encrypted:
            raise UnsupportedOperation(
                "encryption: the rbd backend cannot encrypt disks (use an lvm class)"
            )
        if request.preallocation not in self.preallocations:
            raise InvalidSpec(
                f"spec.preallocation: {request.preallocation!r} is not supported by the rbd "
                "backend (RBD images are thin; use none)"
            )
        cluster, pool, image = self.cluster(ref), self._pool(ref), self.image(ref)
        existing = cluster.facts(pool, image)
        if existing is not None and _complete(existing, pool, image):
            return _state(existing)
        cluster.remove_image(pool, image)  # leftovers of a crashed attempt, if any
        try:
            extra = self._populate(ref, cluster, pool, image, request)
            cluster.set_metadata(
                pool,
                image,
                {
                    DISK: str(ref),
                    NODE: self.settings.node_name,
                    **extra,
                    COMPLETE: f"{pool}/{image}",
                },
            )
        except BaseException:
            with suppress(VMDiskError):
                cluster.remove_image(pool, image)
            raise
        state = self.state(ref)
        assert state is not None
        return state

    def _populate(
        self, ref: DiskRef, cluster: Cluster, pool: str, image: str, request: CreateRequest
    ) -> dict[str, str]:
        """Make ``pool/image`` hold the requested content; extra metadata to record."""
        content, timeout = request.content, self.settings.command_timeout
        if isinstance(content, FromStore):
            self._clone(cluster, StoreUrl.parse(content.url), pool, image, request.size)
            return {}
        if isinstance(content, FromImage):
            size = max(request.size, content.image.virtual_size)
            cluster.create_image(pool, image, size)
            cluster.write_image(
                str(content.image.path),
                content.image.format,
                pool,
                image,
                timeout=timeout,
                progress=request.progress,
            )
            return {BASE_IMAGE: content.image.id}
        if isinstance(content, FromDisk):
            cluster.create_image(pool, image, request.size)
            source = content.source
            cluster.write_image(
                str(source.path),
                source.format,
                pool,
                image,
                snapshot=source.snapshot,
                timeout=timeout,
                progress=request.progress,
            )
            return {}
        assert isinstance(content, Blank)
        cluster.create_image(pool, image, request.size)
        if content.filesystem is not None:
            scratch_dir = self.layout.partial_disk_dir(ref.namespace, ref.name)
            remove_path(scratch_dir)
            scratch_dir.mkdir(parents=True)
            try:
                scratch = scratch_dir / "mkfs.raw"
                with open(scratch, "wb") as handle:
                    handle.truncate(request.size)
                make_filesystem(scratch, content.filesystem)
                cluster.write_image(str(scratch), "raw", pool, image, timeout=timeout)
            finally:
                remove_path(scratch_dir)
        return {}

    def _clone(self, cluster: Cluster, url: StoreUrl, pool: str, image: str, size: int) -> None:
        fsid = cluster.fsid()
        if url.fsid != fsid:
            raise SourceNotInCluster(
                f"spec.source.image.url: {url} is in Ceph cluster {url.fsid}, not in this "
                f"node's cluster {fsid}; copy-on-write clones only work within one cluster"
            )
        parent = url.parent
        facts = cluster.facts(parent.pool, parent.image)
        if facts is None or parent.snapshot not in {name for name, _ in facts.snapshots}:
            raise SourceSnapshotMissing(f"spec.source.image.url: {parent} does not exist")
        if size and size < facts.size:
            raise ImageLargerThanDisk(
                f"spec.size: {size} bytes is smaller than the parent image {parent} "
                f"({facts.size} bytes)"
            )
        cluster.clone(parent, pool, image)
        if size > facts.size:
            cluster.resize(pool, image, size)

    def resize(self, ref: DiskRef, size: int) -> DiskState:
        self.cluster(ref).resize(self._pool(ref), self.image(ref), size)
        return self._require_state(ref)

    def prepare_online_grow(self, ref: DiskRef, size: int) -> None:
        """Grow the image; librbd hands the request to the lock owner (the VM's QEMU)."""
        if self._require_state(ref).virtual_size < size:
            self.cluster(ref).resize(self._pool(ref), self.image(ref), size)

    def holders(self, ref: DiskRef) -> list[str]:
        """RBD clients with the image open (QEMU watches the images it opens)."""
        try:
            clients = self.cluster(ref).clients(self._pool(ref), self.image(ref))
        except CephNotFound:
            return []
        return [f"RBD {client}" for client in clients]

    def readable(self, ref: DiskRef, snapshot: str | None = None) -> Readable:
        """An ``rbd:pool/image[@snap]:conf=...`` filename qemu-img opens (block-rbd).

        ``Readable.path`` holds it as a Path: qemu-img only ever sees its string,
        which a Path keeps intact (no ``//`` or trailing ``/`` in it).
        """
        if snapshot is not None and snapshot not in self.snapshots(ref):
            raise SnapshotMissing(f"snapshot {snapshot!r} of disk {ref} does not exist")
        name = self.cluster(ref).qemu_filename(self._pool(ref), self.image(ref), snapshot)
        return Readable(Path(name), "raw")

    def delete(self, ref: DiskRef) -> None:
        """Remove the image; HasDependents while clones depend on its snapshots."""
        self.cluster(ref).remove_image(self._pool(ref), self.image(ref))

    # -- SupportsSnapshots -------------------------------------------------------------
    def snapshots(self, ref: DiskRef) -> tuple[str, ...]:
        facts = self.cluster(ref).facts(self._pool(ref), self.image(ref))
        return tuple(name for name, _ in facts.snapshots) if facts else ()

    def create_snapshot(self, ref: DiskRef, name: str) -> int:
        cluster, pool, image = self.cluster(ref), self._pool(ref), self.image(ref)
        cluster.create_snapshot(pool, image, name)
        return self._require_state(ref).virtual_size

    def create_live_snapshot(self, ref: DiskRef, name: str, live: PointInTime) -> int:
        """librbd hands the request to the exclusive-lock owner (the VM's QEMU), which
        flushes its in-flight writes and takes the snapshot between two of them."""
        with live.frozen():
            return self.create_snapshot(ref, name)

    def remove_snapshot(self, ref: DiskRef, name: str, *, ignore_missing: bool = False) -> None:
        try:
            removed = self.cluster(ref).remove_snapshot(self._pool(ref), self.image(ref), name)
        except CephNotFound:
            removed = False
        if not removed and not ignore_missing:
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")

    def rollback(self, ref: DiskRef, name: str) -> DiskState:
        if name not in self.snapshots(ref):
            raise SnapshotMissing(f"snapshot {name!r} of disk {ref} does not exist")
        cluster, pool, image = self.cluster(ref), self._pool(ref), self.image(ref)
        cluster.rollback(pool, image, name)
        cluster.set_metadata(pool, image, {RESTORED: name})
        return self._require_state(ref)

    # -- SupportsFlatten ------------------------------------------------------------------
    def flatten(self, ref: DiskRef) -> DiskState:
        self.cluster(ref).flatten(self._pool(ref), self.image(ref))
        return self._require_state(ref)

    # -- SupportsDirectSnapshot -------------------------------------------------------------
    def direct_snapshot(self, ref: DiskRef, name: str, pool: str) -> str:
        """Nova's direct_snapshot: snapshot, clone into ``pool``, flatten, publish ``snap``."""
        cluster, source_pool, source = self.cluster(ref), self._pool(ref), self.image(ref)
        self._pool(DiskRef(ref.namespace, ref.name, pool))  # a pool this node allows
        target = export_image(ref.namespace, name)
        url = str(StoreUrl(cluster.fsid(), SnapshotSpec(pool, target, EXPORT_SNAPSHOT)))
        existing = cluster.facts(pool, target)
        if existing is not None and _complete(existing, pool, target):
            return url
        cluster.remove_image(pool, target)  # a half-made export of a crashed attempt
        cluster.create_snapshot(source_pool, source, name)
        try:
            cluster.clone(SnapshotSpec(source_pool, source, name), pool, target)
            cluster.flatten(pool, target)  # no longer tied to the disk's snapshot
            cluster.create_snapshot(pool, target, EXPORT_SNAPSHOT)
            cluster.set_metadata(pool, target, {DISK: str(ref), COMPLETE: f"{pool}/{target}"})
        except BaseException:
            with suppress(VMDiskError):
                cluster.remove_image(pool, target)
            raise
        return url

    def remove_direct_snapshot(self, ref: DiskRef, name: str, pool: str) -> None:
        self.cluster(ref).remove_image(pool, export_image(ref.namespace, name))

    # -- SupportsDependents -----------------------------------------------------------------
    def snapshot_dependents(self, ref: DiskRef, name: str, export_pool: str | None) -> list[str]:
        """Clones of ``disk@name`` (other than our own export) and of the export's ``snap``."""
        cluster = self.cluster(ref)
        export = export_image(ref.namespace, name)
        ours = f"{export_pool}/{export}" if export_pool else None
        found = cluster.snapshot_children(self._pool(ref), self.image(ref), name)
        found = [image for image in found if image != ours]
        if export_pool is not None:
            found += cluster.snapshot_children(export_pool, export, EXPORT_SNAPSHOT)
        return sorted(found)

    # -- SupportsClaim ----------------------------------------------------------------------
    def claim(self, ref: DiskRef) -> None:
        """Record this node as the disk's node, so inventories follow a moved VM."""
        cluster, pool, image = self.cluster(ref), self._pool(ref), self.image(ref)
        if cluster.metadata(pool, image).get(NODE) != self.settings.node_name:
            cluster.set_metadata(pool, image, {NODE: self.settings.node_name})

    # -- SupportsCapacity -------------------------------------------------------------------
    def capacity(self) -> Capacity:
        """The node's default pool: what it stores plus what it can still take, and the latter."""
        pool = self.settings.pool
        if pool is None:
            raise UnsupportedOperation("no default RBD pool (VMDISK_RBD_POOL) to report on")
        stored, available = self.cluster(DiskRef("-", "-", pool)).pool_usage(pool)
        return Capacity(pool, stored + available, available)

    # -- SupportsInventory ------------------------------------------------------------------
    def inventory(self) -> list[DiskRef]:
        """Our images in the node's default pool that this node serves.

        RBD is shared: listing every image would make each node report the
        others' disks as orphans, so the serving node (metadata, updated by
        ``claim`` when a disk moves) is checked.
        """
        pool = self.settings.pool
        if pool is None:
            return []
        probe = DiskRef("-", "-", pool)
        cluster = self.cluster(probe)
        found: list[DiskRef] = []
        for image in cluster.list_images(pool):
            parsed = parse_disk_image(image)
            if parsed is None:
                continue
            try:
                metadata = cluster.metadata(pool, image)
            except CephNotFound:
                continue  # removed meanwhile
            if metadata.get(NODE) == self.settings.node_name:
                found.append(DiskRef(parsed[0], parsed[1], pool))
        return found

    # -- helpers ------------------------------------------------------------------------------
    def _require_state(self, ref: DiskRef) -> DiskState:
        state = self.state(ref)
        if state is None:
            raise PermanentError(
                f"RBD image {self._pool(ref)}/{self.image(ref)} vanished", reason="DiskMissing"
            )
        return state


def _complete(facts: ImageFacts | None, pool: str, image: str) -> bool:
    """The image is finished: it carries its own completion marker, written last."""
    return facts is not None and facts.metadata.get(COMPLETE) == f"{pool}/{image}"


def _state(facts: ImageFacts) -> DiskState:
    return DiskState(
        format="raw",
        virtual_size=facts.size,
        actual_size=facts.used,
        base_image=facts.metadata.get(BASE_IMAGE),
        restored_snapshot=facts.metadata.get(RESTORED),
        parent=facts.parent,
    )
