"""The node's libvirtd, through libvirt-python: which running domains use a disk, and
the online operations vmdisk asks of them (``virDomainBlockResize``).

A domain "uses" a disk when its live XML names the disk anywhere in a
``<disk>``: the top image, a ``<backingStore>`` layer (after an external
snapshot) or a block job's ``<mirror>``; by file or device path (compared
after resolving symlinks, so ``/dev/vg/lv`` matches ``/dev/dm-3``) or, for
network disks, by protocol and ``pool/image`` name.

The connection is opened on first use and reused; a connection that broke is
reopened on the next call.  Every call is bounded in time (``Hypervisor.timeout``,
a live backup by its own deadline): a libvirtd that hangs is
``HypervisorUnavailable``, never a handler that waits forever.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import TemporaryError


def _lazy_import(name: str) -> Any:
    """``import name``, executed on first attribute access (importlib's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The bindings load on first use, not with this module: a command that never
# asks libvirt (a new disk has no domain to check) does not pay for them.
libvirt = _lazy_import("libvirt")

log = logging.getLogger(__name__)
T = TypeVar("T")


class HypervisorUnavailable(TemporaryError):
    reason = "HypervisorUnavailable"


class OnlineOperationFailed(TemporaryError):
    """libvirt refused an online operation; retried (offline once the domain stops)."""

    reason = "OnlineOperationFailed"


@dataclass(frozen=True)
class DomainDisk:
    """One running domain's device that uses a disk."""

    domain: str
    uuid: str
    target: str  # the guest device (vda, sdb): what virDomainBlockResize names

    def __str__(self) -> str:
        return f"domain {self.domain!r} (target {self.target})"


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error; they arrive as exceptions anyway."""


class Hypervisor:
    """The libvirtd at ``uri`` (``qemu:///system`` on a node)."""

    def __init__(self, uri: str, timeout: float = 30.0) -> None:
        self.uri = uri
        self.timeout = timeout  # seconds a domain listing may take before libvirt counts as away
        self._conn: Any = None
        self._lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------
    def _connection(self) -> Any:
        # Only ever called on a bounded worker thread (see _bounded).
        with self._lock:
            if self._conn is not None and self._alive(self._conn):
                return self._conn
            libvirt.registerErrorHandler(_quiet, None)
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                self._conn = None
                raise HypervisorUnavailable(
                    f"libvirt at {self.uri} did not answer: {exc.get_error_message()}"
                ) from exc
            return self._conn

    @staticmethod
    def _alive(conn: Any) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                log.debug("closing the libvirt connection failed", exc_info=True)

    # -- queries -------------------------------------------------------------------------
    def _bounded(self, what: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        """``fn()`` on a worker thread, given up after ``timeout`` (default ``self.timeout``).

        libvirt calls block in C with no timeout of their own; a worker stuck
        on a hung libvirtd is left behind (a daemon thread) and the caller
        gets HypervisorUnavailable.
        """
        limit = self.timeout if timeout is None else timeout
        result: list[T | BaseException] = []
        done = threading.Event()

        def work() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # handed to the caller
                result.append(exc)
            done.set()

        threading.Thread(target=work, name=f"libvirt: {what}", daemon=True).start()
        if not done.wait(limit):
            raise HypervisorUnavailable(
                f"libvirt at {self.uri} did not answer in {limit:g}s ({what})"
            )
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def disks_using(
        self, *, paths: Iterable[str] = (), network: tuple[str, str] | None = None
    ) -> list[DomainDisk]:
        """Running domains' devices that name one of ``paths`` or ``(protocol, name)``."""
        wanted = {os.path.realpath(p) for p in paths}
        return self._bounded("list domains", lambda: self._disks_using(wanted, network))

    def _disks_using(self, wanted: set[str], network: tuple[str, str] | None) -> list[DomainDisk]:
        conn = self._connection()
        try:
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            raise HypervisorUnavailable(
                f"listing the domains of {self.uri} failed: {exc.get_error_message()}"
            ) from exc
        found: list[DomainDisk] = []
        for domain in domains:
            try:
                xml = domain.XMLDesc(0)
                name, uuid = domain.name(), domain.UUIDString()
            except libvirt.libvirtError:
                continue  # it stopped meanwhile
            for target, sources in _disk_sources(xml):
                if any(_matches(s, wanted, network) for s in sources):
                    found.append(DomainDisk(name, uuid, target))
        return found

    def block_capacity(self, disk: DomainDisk) -> int:
        """The size QEMU reports for the domain's device, in bytes."""
        return int(self._call(disk, "read the size of", lambda d: d.blockInfo(disk.target))[0])

    # -- online operations ---------------------------------------------------------------
    def freeze(self, disk: DomainDisk) -> bool:
        """Freeze the guest's filesystems through its agent; False when no agent answers."""

        def freeze() -> bool:
            try:
                return bool(self._connection().lookupByUUIDString(disk.uuid).fsFreeze())
            except libvirt.libvirtError as exc:
                log.info("%s: no quiesce (%s)", disk, exc.get_error_message())
                return False

        return self._bounded(f"freeze {disk}", freeze)

    def backup(self, live: LiveDomain, target: Path, fmt: str) -> None:
        """Run a push backup of ``live.disk`` into the new file ``target`` and wait for it."""
        # The job polls its own deadline; the bound is for a libvirtd that stops answering.
        self._bounded(
            f"back up {live.disk}",
            lambda: self._backup(live, target, fmt),
            live.timeout + self.timeout,
        )

    def _backup(self, live: LiveDomain, target: Path, fmt: str) -> None:
        disk = live.disk
        conn = self._connection()
        try:
            domain = conn.lookupByUUIDString(disk.uuid)
            if domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                # Perhaps our own backup, started before a crash: let it end first.
                raise OnlineOperationFailed(f"{disk} is busy with another job; retrying later")
            xml = _backup_xml(domain.XMLDesc(0), disk.target, target, fmt)
            with live.frozen():
                domain.backupBegin(xml, None, 0)
            deadline = time.monotonic() + live.timeout
            while domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                if time.monotonic() > deadline:
                    domain.abortJob()
                    raise OnlineOperationFailed(f"the backup of {disk} overran {live.timeout}s")
                time.sleep(0.05)
            done = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError as exc:
            raise OnlineOperationFailed(
                f"libvirt could not back up {disk}: {exc.get_error_message()}"
            ) from exc
        if done.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
            raise OnlineOperationFailed(f"the backup of {disk} did not complete: {done}")

    def thaw(self, disk: DomainDisk) -> None:
        """Thaw what ``freeze`` froze; a guest left frozen would hang, so this retries."""
        for attempt in range(3):
            try:
                self._bounded(
                    f"thaw {disk}",
                    lambda: self._connection().lookupByUUIDString(disk.uuid).fsThaw(),
                )
                return
            except (libvirt.libvirtError, HypervisorUnavailable):
                log.exception("%s: thawing the guest failed (attempt %d)", disk, attempt + 1)
        raise OnlineOperationFailed(f"the filesystems of {disk} could not be thawed")

    def block_resize(self, disk: DomainDisk, size: int) -> None:
        """Grow the device to ``size`` bytes through QEMU, which tells the guest at once."""
        flags = libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES
        self._call(disk, "grow", lambda d: d.blockResize(disk.target, size, flags))

    def _call(self, disk: DomainDisk, what: str, fn: Callable[[Any], T]) -> T:
        def call() -> T:
            try:
                return fn(self._connection().lookupByUUIDString(disk.uuid))
            except libvirt.libvirtError as exc:
                raise OnlineOperationFailed(
                    f"libvirt could not {what} {disk}: {exc.get_error_message()}"
                ) from exc

        return self._bounded(f"{what} {disk}", call)


@dataclass
class LiveDomain:
    """A point in time of one running domain's disk: what live snapshots are made with.

    ``quiesced`` says afterwards whether the guest's filesystems were frozen
    (through its agent) at that point.
    """

    hypervisor: Hypervisor
    disk: DomainDisk
    timeout: float = 3600.0
    quiesced: bool = field(default=False, init=False)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The guest's filesystems frozen while inside, when its agent answers."""
        self.quiesced = self.hypervisor.freeze(self.disk)
        try:
            yield
        finally:
            if self.quiesced:
                self.hypervisor.thaw(self.disk)

    def copy(self, target: Path, fmt: str) -> None:
        """A point-in-time copy of the disk into ``target`` (libvirt's push backup).

        QEMU copies the blocks the guest is about to overwrite first, so the
        guest runs on while the copy is made; it is frozen only while the
        backup job starts.  The disk the domain uses does not change.
        """
        self.hypervisor.backup(self, target, fmt)


def _backup_xml(domain_xml: str, target_dev: str, target: Path, fmt: str) -> str:
    """A push backup of ``target_dev`` only: every other disk says backup='no'."""
    backup = ET.Element("domainbackup", mode="push")
    disks = ET.SubElement(backup, "disks")
    for dev, _sources in _disk_sources(domain_xml):
        if dev != target_dev:
            ET.SubElement(disks, "disk", name=dev, backup="no")
            continue
        disk = ET.SubElement(disks, "disk", name=dev, backup="yes", type="file")
        ET.SubElement(disk, "driver", type=fmt)
        ET.SubElement(disk, "target", file=str(target))
    return ET.tostring(backup, encoding="unicode")


def _disk_sources(xml: str) -> Iterator[tuple[str, list[ET.Element]]]:
    """Each ``<disk>``'s target and every ``<source>`` inside it (backing chain, mirror)."""
    root = ET.fromstring(xml)
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        yield str(target.get("dev")), list(disk.iter("source"))


def _matches(source: ET.Element, paths: set[str], network: tuple[str, str] | None) -> bool:
    path = source.get("file") or source.get("dev")
    if path:
        return os.path.realpath(path) in paths
    if network is not None:
        return (source.get("protocol"), source.get("name")) == network
    return False
