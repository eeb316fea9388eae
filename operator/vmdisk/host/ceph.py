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

The RBD image operations on top of it live in ``host/rbd_images.py``.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import rados
import rbd

from ..errors import PermanentError, TemporaryError, VMDiskError
from .names import check_ceph_name as check_name

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


@dataclass
class _Connection:
    handle: Any  # rados.Rados
    abandoned: bool = False


@dataclass
class CephConnection:
    """A lazily opened, reused librados connection with bounded, typed calls."""

    access: CephAccess
    _conn: _Connection | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # -- connection -----------------------------------------------------------------
    def _new_handle(self) -> Any:
        if self.access.user is not None:
            check_name("user", self.access.user)
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
        ioctx = handle.open_ioctx(check_name("pool", pool))
        try:
            yield ioctx
        finally:
            ioctx.close()

    def on_pool(
        self, what: str, pool: str, fn: Callable[[Any], T], *, timeout: float | None = None
    ) -> T:
        """Run ``fn(ioctx)`` on ``pool``."""
        check_name("pool", pool)  # before connecting

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

        check_name("image", image)
        if snapshot is not None:
            check_name("snapshot", snapshot)

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
        name = (
            f"{_qemu_escape(check_name('pool', pool))}/{_qemu_escape(check_name('image', image))}"
        )
        if snapshot is not None:
            name += f"@{_qemu_escape(check_name('snapshot', snapshot))}"
        options = self.access.conf_options()
        if self.access.conf is not None:
            options["conf"] = str(self.access.conf)
        options["id"] = self.access.user or "admin"
        return "rbd:" + name + "".join(f":{k}={_qemu_escape(v)}" for k, v in options.items())


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
