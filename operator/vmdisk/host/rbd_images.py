"""RBD image operations over one bounded Ceph connection (``host/ceph.py``).

Bulk data never flows through Python: imports, copies and exports are
``qemu-img convert`` into or out of an ``rbd:`` filename (``host.run``).
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import rbd

from ..errors import HasDependents
from .ceph import CephConnection, CephError, CephNotFound
from .names import check_ceph_name as check_name
from .run import Progress, run

META_PREFIX = "vmdisk."


@dataclass(frozen=True)
class SnapshotSpec:
    """``pool/image@snapshot``."""

    pool: str
    image: str
    snapshot: str

    def __str__(self) -> str:
        return f"{self.pool}/{self.image}@{self.snapshot}"


@dataclass(frozen=True)
class ImageFacts:
    """One RBD image as librbd reports it."""

    size: int
    used: int  # bytes in the image's own objects (not its parent's)
    parent: str | None  # "pool/image@snap" for clones
    snapshots: tuple[tuple[str, bool], ...]  # (name, protected)
    metadata: dict[str, str]  # the "vmdisk." keys


@dataclass
class Cluster(CephConnection):
    """The image operations vmdisk needs, each bounded and typed."""

    # -- data path through qemu-img ---------------------------------------------------
    def write_image(
        self,
        source: str,
        source_format: str,
        pool: str,
        image: str,
        *,
        snapshot: str | None = None,
        timeout: float,
        progress: Progress | None = None,
    ) -> None:
        """Write ``source`` (a file or rbd: filename) into the new, zeroed ``pool/image``.

        qemu-img reads any format and, told the target is zeroed, writes no
        zero blocks: a sparse image stays thin in the pool.
        """
        argv = ["qemu-img", "convert", "-p" if progress else "-q", "-n", "--target-is-zero"]
        if snapshot is not None:  # a qcow2 internal snapshot of a file source
            argv += ["-l", f"snapshot.name={snapshot}"]
        argv += ["-W", "-f", source_format, "-O", "raw", source, self.qemu_filename(pool, image)]
        run(argv, timeout=timeout, progress=progress)

    # -- librbd operations ------------------------------------------------------------
    def facts(self, pool: str, image: str) -> ImageFacts | None:
        """Size, own allocation, parent, snapshots and vmdisk metadata; None when absent."""

        def read(handle: Any) -> ImageFacts:
            size = int(handle.size())
            used = [0]

            def count(_offset: int, length: int, exists: bool) -> int:
                if exists:
                    used[0] += length
                return 0

            # Only the image's own objects: a clone's parent data is not its cost.
            handle.diff_iterate(0, size, None, count, include_parent=False, whole_object=True)
            try:
                spec = handle.get_parent_image_spec()
                parent: str | None = f"{spec['pool_name']}/{spec['image_name']}@{spec['snap_name']}"
            except rbd.ImageNotFound:
                parent = None
            snaps = tuple(
                (s["name"], bool(handle.is_protected_snap(s["name"]))) for s in handle.list_snaps()
            )
            metadata = {k: v for k, v in handle.metadata_list() if k.startswith(META_PREFIX)}
            return ImageFacts(size, used[0], parent, snaps, metadata)

        try:
            return self.on_image(f"inspect {pool}/{image}", pool, image, read, read_only=True)
        except CephNotFound:
            return None

    def pool_usage(self, pool: str) -> tuple[int, int]:
        """``(stored, max_avail)`` bytes of ``pool``, as ``ceph df`` reports them.

        ``max_avail`` is what the pool can still take given its replication
        and its fullest OSD: the figure an operator plans with.  The monitors
        answer with the manager's statistics (a cluster without a ceph-mgr
        reports nothing, and this raises CephError).
        """

        def work(handle: Any) -> tuple[int, int]:
            command = json.dumps({"prefix": "df", "format": "json"})
            ret, out, err = handle.mon_command(command, b"", timeout=self.access.op_timeout)
            if ret != 0:
                raise CephError(f"ceph df failed ({ret}): {err}")
            for entry in json.loads(out).get("pools", []):
                if entry.get("name") == pool:
                    stats = entry["stats"]
                    return int(stats["stored"]), int(stats["max_avail"])
            raise CephError(f"ceph df reports nothing for pool {pool!r} (is a ceph-mgr running?)")

        return self.call(f"usage of pool {pool}", work)

    def list_images(self, pool: str) -> list[str]:
        return sorted(self.on_pool(f"list pool {pool}", pool, lambda io: rbd.RBD().list(io)))

    def create_image(self, pool: str, image: str, size: int) -> None:
        check_name("image", image)
        self.on_pool(
            f"create {pool}/{image}",
            pool,
            lambda io: rbd.RBD().create(io, image, size, old_format=False),
        )

    def clone(self, parent: SnapshotSpec, pool: str, image: str) -> None:
        """A copy-on-write child of the protected snapshot ``parent``.

        The child starts with none of the parent's ``vmdisk.`` metadata.
        """
        for kind, name in (
            ("pool", parent.pool),
            ("image", parent.image),
            ("snapshot", parent.snapshot),
            ("pool", pool),
            ("image", image),
        ):
            check_name(kind, name)

        def work(handle: Any) -> None:
            with (
                self._ioctx(handle, parent.pool) as parent_io,
                self._ioctx(handle, pool) as child_io,
            ):
                with rbd.Image(parent_io, parent.image, read_only=True) as source:
                    if not source.is_protected_snap(parent.snapshot):
                        raise CephError(
                            f"snapshot {parent} is not protected; protect it "
                            f"(rbd snap protect {parent}) so clones can depend on it",
                            reason="SourceNotProtected",
                        )
                rbd.RBD().clone(parent_io, parent.image, parent.snapshot, child_io, image)
                # librbd copies the parent's image-meta into the clone; ours
                # describe the parent, never the child.
                with rbd.Image(child_io, image) as child:
                    for key, _value in list(child.metadata_list()):
                        if key.startswith(META_PREFIX):
                            child.metadata_remove(key)

        self.call(f"clone {parent} to {pool}/{image}", work)

    def remove_image(self, pool: str, image: str) -> None:
        """Remove the image and its snapshots; HasDependents while clones use them."""
        check_name("image", image)

        def work(ioctx: Any) -> None:
            try:
                handle = rbd.Image(ioctx, image)
            except rbd.ImageNotFound:
                # Absent, or half-made (a clone or create killed midway): listed
                # but not openable.  librbd's remove cleans up the latter.
                with suppress(rbd.ImageNotFound):
                    rbd.RBD().remove(ioctx, image)
                return
            with handle:
                children = _children(handle)
                if children:
                    raise HasDependents(
                        f"RBD image {pool}/{image} has clones that depend on its snapshots: "
                        f"{', '.join(children)}; flatten them (spec.rbd.flatten: true) or "
                        "delete them first"
                    )
                for snap in handle.list_snaps():
                    if handle.is_protected_snap(snap["name"]):
                        handle.unprotect_snap(snap["name"])
                    handle.remove_snap(snap["name"])
            with suppress(rbd.ImageNotFound):
                rbd.RBD().remove(ioctx, image)

        self.on_pool(f"remove {pool}/{image}", pool, work, timeout=self._long)

    def clients(self, pool: str, image: str) -> list[str]:
        """Other clients that have ``pool/image`` open: watchers, lock owners, lockers.

        Every librbd client that opens an image read-write watches its header
        (QEMU does); our own probe's watch, if any, is left out by its client id.
        """

        def work(handle: Any) -> list[str]:
            me = conn_id[0]
            found = [
                f"client.{w['id']} at {w['addr']}"
                for w in handle.watchers_list()
                if int(w["id"]) != me
            ]
            try:
                owners = [o["owner"] for o in handle.lock_get_owners()]
            except rbd.InvalidArgument:  # librbd's answer when nobody owns the lock
                owners = []
            found += [f"exclusive lock owner {owner}" for owner in owners]
            lockers = handle.list_lockers() or {}
            found += [f"lock holder {entry[0]}" for entry in lockers.get("lockers", [])]
            return found

        conn_id = [self.call("read our client id", lambda h: int(h.get_instance_id()))]
        return self.on_image(f"list clients of {pool}/{image}", pool, image, work, read_only=True)

    def children(self, pool: str, image: str) -> list[str]:
        return self.on_image(f"list clones of {pool}/{image}", pool, image, _children)

    def snapshot_children(self, pool: str, image: str, snapshot: str) -> list[str]:
        """Clones of ``pool/image@snapshot`` as ``pool/image``; none when either is absent."""

        def work(handle: Any) -> list[str]:
            if not any(s["name"] == snapshot for s in handle.list_snaps()):
                return []
            return _snapshot_children(handle, snapshot)

        try:
            return self.on_image(
                f"list clones of {pool}/{image}@{snapshot}", pool, image, work, read_only=True
            )
        except CephNotFound:
            return []

    def resize(self, pool: str, image: str, size: int) -> None:
        self.on_image(f"resize {pool}/{image}", pool, image, lambda h: h.resize(size))

    def create_snapshot(self, pool: str, image: str, snapshot: str) -> None:
        """Create (if missing) and protect ``image@snapshot``."""

        def work(handle: Any) -> None:
            if not any(s["name"] == snapshot for s in handle.list_snaps()):
                handle.create_snap(snapshot)
            if not handle.is_protected_snap(snapshot):
                handle.protect_snap(snapshot)

        self.on_image(f"snapshot {pool}/{image}@{snapshot}", pool, image, work)

    def remove_snapshot(self, pool: str, image: str, snapshot: str) -> bool:
        """Unprotect and remove; False when it did not exist, HasDependents with clones."""

        def work(handle: Any) -> bool:
            if not any(s["name"] == snapshot for s in handle.list_snaps()):
                return False
            if handle.is_protected_snap(snapshot):
                clones = _snapshot_children(handle, snapshot)
                if clones:
                    raise HasDependents(
                        f"snapshot {pool}/{image}@{snapshot} still has clones: "
                        f"{', '.join(clones)}; flatten or delete them first"
                    )
                handle.unprotect_snap(snapshot)
            handle.remove_snap(snapshot)
            return True

        return self.on_image(f"remove {pool}/{image}@{snapshot}", pool, image, work)

    def rollback(self, pool: str, image: str, snapshot: str) -> None:
        self.on_image(
            f"roll {pool}/{image} back to {snapshot}",
            pool,
            image,
            lambda h: h.rollback_to_snap(snapshot),
            timeout=self._long,
        )

    def flatten(self, pool: str, image: str) -> None:
        """Copy the parent's data in so the image no longer depends on it."""
        what = f"flatten {pool}/{image}"
        self.on_image(what, pool, image, lambda h: h.flatten(), timeout=self._long)

    def set_metadata(self, pool: str, image: str, values: dict[str, str]) -> None:
        def work(handle: Any) -> None:
            for key, value in values.items():
                handle.metadata_set(key, value)

        self.on_image(f"tag {pool}/{image}", pool, image, work)

    def metadata(self, pool: str, image: str) -> dict[str, str]:
        """The image's ``vmdisk.`` metadata keys."""
        return self.on_image(
            f"read metadata of {pool}/{image}",
            pool,
            image,
            lambda h: {k: v for k, v in h.metadata_list() if k.startswith(META_PREFIX)},
            read_only=True,
        )

    @property
    def _long(self) -> float:
        return self.access.long_timeout


def _snapshot_children(handle: Any, snapshot: str) -> list[str]:
    """Clones of one snapshot of the open image, as ``pool/image``."""
    handle.set_snap(snapshot)
    try:
        return sorted(f"{pool}/{image}" for pool, image in handle.list_children())
    finally:
        handle.set_snap(None)


def _children(handle: Any) -> list[str]:
    """Clones of any snapshot of the open image, as ``pool/image``."""
    return sorted(
        c for snap in handle.list_snaps() for c in _snapshot_children(handle, snap["name"])
    )
