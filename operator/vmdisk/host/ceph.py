"""The one door to librados and librbd.

* One connection per (conf, user, keyring), opened on first use, reused by
  every call in the process, and shut down by ``close()``.
* Every call is bounded twice: librados' own op timeouts
  (``rados_osd_op_timeout``, ``rados_mon_op_timeout``, ``client_mount_timeout``)
  make a blocked OSD or monitor return ``ETIMEDOUT``, and a thread-based
  deadline catches whatever those miss.  A call that overran its deadline
  abandons the connection (the stuck thread shuts it down when librados
  finally returns) so the next call starts on a fresh one.
* Errors are typed: timeouts, ``EBUSY`` and lost connections are
  ``TemporaryError``s, the rest ``PermanentError``s, a missing image or
  snapshot is ``CephNotFound``.

Bulk data never flows through Python: imports, copies and exports are
``qemu-img convert`` into or out of an ``rbd:`` filename (``host.run``).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import rados
import rbd

from ..errors import HasDependents, PermanentError, TemporaryError, VMDiskError
from .run import Progress, run

log = logging.getLogger(__name__)
T = TypeVar("T")

_TEMPORARY = frozenset(
    {
        errno.ETIMEDOUT,
        errno.EBUSY,
        errno.EAGAIN,
        errno.EINTR,
        errno.ESHUTDOWN,
        errno.ENOTCONN,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ENOSPC,  # the cluster is full: retry once space is freed
        errno.EDQUOT,
    }
)


class CephTimeout(TemporaryError):
    reason = "CephTimeout"


class CephUnavailable(TemporaryError):
    reason = "CephUnavailable"


class CephError(PermanentError):
    reason = "CephError"


class CephNotFound(PermanentError):
    reason = "CephNotFound"


@dataclass(frozen=True)
class CephAccess:
    """How to reach one cluster: its config file, client id and keyring."""

    conf: Path | None = None  # None: librados' default search (/etc/ceph/ceph.conf)
    user: str | None = None  # client id without "client."; None: admin
    keyring: Path | None = None  # None: the keyring ceph.conf names
    op_timeout: float = 30.0  # seconds for one librados operation
    long_timeout: float = 3600.0  # whole-image operations: flatten, rollback, remove

    def conf_options(self) -> dict[str, str]:
        timeout = str(max(1, round(self.op_timeout)))
        options = {
            "rados_osd_op_timeout": timeout,
            "rados_mon_op_timeout": timeout,
            "client_mount_timeout": timeout,
        }
        if self.keyring is not None:
            options["keyring"] = str(self.keyring)
        return options


def _typed(what: str, exc: BaseException) -> VMDiskError:
    code = getattr(exc, "errno", None)
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, rbd.ImageNotFound | rados.ObjectNotFound) or code == errno.ENOENT:
        return CephNotFound(f"{what}: not found ({detail})")
    if isinstance(exc, rbd.Timeout | rados.TimedOut) or code == errno.ETIMEDOUT:
        return CephTimeout(f"{what}: Ceph did not answer in time ({detail})", delay=15.0)
    if isinstance(exc, rbd.ConnectionShutdown) or code in _TEMPORARY:
        return CephUnavailable(f"{what}: {detail}", delay=15.0)
    return CephError(f"{what}: {detail}")


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
class _Connection:
    handle: Any  # rados.Rados
    abandoned: bool = False


@dataclass
class Cluster:
    """A lazily opened, reused librados connection with bounded, typed calls."""

    access: CephAccess
    _conn: _Connection | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # -- connection -----------------------------------------------------------------
    def _new_handle(self) -> Any:
        conffile = str(self.access.conf) if self.access.conf else ""
        handle = rados.Rados(
            conffile=conffile, rados_id=self.access.user or "admin", conf=self.access.conf_options()
        )
        return handle

    def _connection(self) -> _Connection:
        with self._lock:
            if self._conn is None:
                handle = self._new_handle()
                timeout = self.access.op_timeout
                try:
                    _bounded("connect", lambda: handle.connect(timeout=timeout), timeout + 5)
                except VMDiskError as exc:
                    raise CephUnavailable(
                        f"cannot connect to the Ceph cluster ({self._describe()}): {exc.message}"
                    ) from exc
                self._conn = _Connection(handle)
            return self._conn

    def _describe(self) -> str:
        conf = self.access.conf or "/etc/ceph/ceph.conf"
        return f"conf {conf}, client.{self.access.user or 'admin'}"

    def close(self) -> None:
        """Shut the connection down; the next call opens a new one."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.handle.shutdown()

    def call(self, what: str, fn: Callable[[Any], T], *, timeout: float | None = None) -> T:
        """Run ``fn(rados_handle)`` within the deadline; errors typed."""
        conn = self._connection()
        deadline = timeout if timeout is not None else 2 * self.access.op_timeout + 5

        def finished() -> None:
            if conn.abandoned:
                conn.handle.shutdown()

        try:
            return _bounded(what, lambda: fn(conn.handle), deadline, on_late_return=finished)
        except CephTimeout:
            with self._lock:
                if self._conn is conn:
                    conn.abandoned = True
                    self._conn = None
            raise

    @contextmanager
    def _ioctx(self, handle: Any, pool: str) -> Iterator[Any]:
        ioctx = handle.open_ioctx(pool)
        try:
            yield ioctx
        finally:
            ioctx.close()

    def on_pool(
        self, what: str, pool: str, fn: Callable[[Any], T], *, timeout: float | None = None
    ) -> T:
        """Run ``fn(ioctx)`` on ``pool``."""

        def work(handle: Any) -> T:
            with self._ioctx(handle, pool) as ioctx:
                return fn(ioctx)

        return self.call(what, work, timeout=timeout)

    def on_image(
        self,
        what: str,
        pool: str,
        image: str,
        fn: Callable[[Any], T],
        *,
        snapshot: str | None = None,
        read_only: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Run ``fn(rbd.Image)`` on ``pool/image`` (opened and closed around it)."""

        def work(ioctx: Any) -> T:
            with rbd.Image(ioctx, image, snapshot=snapshot, read_only=read_only) as handle:
                return fn(handle)

        return self.on_pool(what, pool, work, timeout=timeout)

    # -- local facts (no network) ---------------------------------------------------
    def mon_host(self) -> str:
        """The ``mon_host`` setting of this cluster's config (read locally)."""
        handle = self._new_handle()
        try:
            return str(handle.conf_get("mon_host") or "")
        finally:
            handle.shutdown()

    def fsid(self) -> str:
        return str(self.call("read the cluster fsid", lambda h: h.get_fsid()))

    def qemu_filename(self, pool: str, image: str, snapshot: str | None = None) -> str:
        """``rbd:pool/image[@snap]:conf=...:id=...`` as qemu-img (block-rbd) opens it."""
        name = f"{_qemu_escape(pool)}/{_qemu_escape(image)}"
        if snapshot is not None:
            name += f"@{_qemu_escape(snapshot)}"
        options = self.access.conf_options()
        if self.access.conf is not None:
            options["conf"] = str(self.access.conf)
        options["id"] = self.access.user or "admin"
        return "rbd:" + name + "".join(f":{k}={_qemu_escape(v)}" for k, v in options.items())

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

    def list_images(self, pool: str) -> list[str]:
        return sorted(self.on_pool(f"list pool {pool}", pool, lambda io: rbd.RBD().list(io)))

    def create_image(self, pool: str, image: str, size: int) -> None:
        self.on_pool(
            f"create {pool}/{image}",
            pool,
            lambda io: rbd.RBD().create(io, image, size, old_format=False),
        )

    def clone(self, parent: SnapshotSpec, pool: str, image: str) -> None:
        """A copy-on-write child of the protected snapshot ``parent``."""

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

        self.call(f"clone {parent} to {pool}/{image}", work)

    def remove_image(self, pool: str, image: str) -> None:
        """Remove the image and its snapshots; HasDependents while clones use them."""

        def work(ioctx: Any) -> None:
            try:
                handle = rbd.Image(ioctx, image)
            except rbd.ImageNotFound:
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

    def children(self, pool: str, image: str) -> list[str]:
        return self.on_image(f"list clones of {pool}/{image}", pool, image, _children)

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
                handle.set_snap(snapshot)
                clones = [f"{p}/{i}" for p, i in handle.list_children()]
                handle.set_snap(None)
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


def _children(handle: Any) -> list[str]:
    """Clones of any snapshot of the open image, as ``pool/image``."""
    found: list[str] = []
    for snap in handle.list_snaps():
        handle.set_snap(snap["name"])
        try:
            found += [f"{pool}/{image}" for pool, image in handle.list_children()]
        finally:
            handle.set_snap(None)
    return sorted(found)


def _qemu_escape(value: str) -> str:
    # QEMU's rbd: filename syntax splits on ':' (options) and '@' (snapshot).
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("@", "\\@")


def _bounded(
    what: str,
    fn: Callable[[], T],
    timeout: float,
    *,
    on_late_return: Callable[[], None] | None = None,
) -> T:
    """``fn()`` in a worker thread; CephTimeout when it has not returned in ``timeout`` s."""
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()
    lock = threading.Lock()
    late = [False]

    def work() -> None:
        try:
            result: tuple[bool, Any] = (True, fn())
        except BaseException as exc:
            result = (False, exc)
        with lock:
            outcome.append(result)
            done.set()
            overran = late[0]
        if overran and on_late_return is not None:
            try:
                on_late_return()
            except Exception:  # pragma: no cover - best effort cleanup of a dead handle
                log.debug("closing an abandoned Ceph connection failed", exc_info=True)

    threading.Thread(target=work, name=f"ceph: {what}", daemon=True).start()
    done.wait(timeout)
    with lock:
        if not outcome:
            late[0] = True
            raise CephTimeout(f"{what}: no answer from Ceph within {timeout:.0f}s", delay=15.0)
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    if isinstance(value, VMDiskError):
        raise value
    if isinstance(value, rados.Error | rbd.Error):
        raise _typed(what, value) from value
    raise value
