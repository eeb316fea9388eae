"""A real libvirtd for the tests, and a helper that boots a disk in QEMU.

Load as a pytest plugin (``pytest_plugins = ["libvirtd"]`` in tests/conftest.py).
The session fixture ``libvirt_system`` reuses a libvirtd that already answers
on ``qemu:///system`` and otherwise starts one (plus virtlogd, which QEMU
domains log through) in the foreground under the test session, stopping only
what it started. There is no systemd here to socket-activate either daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

SYSTEM_URI = "qemu:///system"
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
# The first start of a fresh libvirtd probes QEMU's capabilities (~8 s here).
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class OpenedImage:
    """One image file QEMU holds open for a disk (the top or a backing layer)."""

    filename: str
    format: str


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt error handler: errors arrive as exceptions, not stderr noise."""


def _answers(uri: str) -> bool:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _start(binary: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # Own session: a Ctrl-C aimed at pytest must not kill the daemons
        # before the fixture has stopped the domains they run.
        return subprocess.Popen(
            [binary], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until(check: Any, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not answer in {START_TIMEOUT:.0f} s:\n{log.read_text()[-2000:]}"
            )
        time.sleep(0.1)


@contextlib.contextmanager
def system_libvirtd(logs: Path) -> Iterator[None]:
    """A libvirtd answering on ``qemu:///system`` (and its virtlogd) while inside.

    Reuses daemons that already answer, starts the others (logging under
    ``logs``) and stops only those.  Also used by ``make bench``.
    """
    libvirt.registerErrorHandler(_quiet, None)
    started: list[subprocess.Popen[bytes]] = []
    try:
        if not _socket_answers(VIRTLOGD_SOCKET):
            log = logs / "virtlogd.log"
            started.append(_start("virtlogd", log))
            _wait_until(lambda: _socket_answers(VIRTLOGD_SOCKET), started[-1], log, "virtlogd")
        if not _answers(SYSTEM_URI):
            log = logs / "libvirtd.log"
            started.append(_start("libvirtd", log))
            _wait_until(lambda: _answers(SYSTEM_URI), started[-1], log, "libvirtd")
        yield
    finally:
        for proc in reversed(started):
            _stop(proc)


@pytest.fixture(scope="session")
def libvirt_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An open ``qemu:///system`` connection to a running libvirtd."""
    libvirt.registerErrorHandler(_quiet, None)
    if not _answers(SYSTEM_URI):
        if os.geteuid() != 0:
            pytest.skip("starting libvirtd for qemu:///system needs root")
        for binary in ("libvirtd", "virtlogd"):
            if shutil.which(binary) is None:
                pytest.fail(f"{binary} is not installed: scripts/setup.sh installs libvirt-daemon")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(system_libvirtd(tmp_path_factory.mktemp("libvirtd")))
        except RuntimeError as exc:
            pytest.fail(str(exc))
        conn = libvirt.open(SYSTEM_URI)
        try:
            yield conn
        finally:
            conn.close()


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_domain_xml(disk_xml: str, name: str) -> str:
    """A minimal guest holding only ``disk_xml``: 64 MiB, no network, no graphics."""
    disk = ET.fromstring(disk_xml)
    domain = ET.Element("domain", type="kvm" if _kvm_usable() else "qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "64"
    ET.SubElement(domain, "vcpu").text = "1"
    ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    target = disk.find("target")
    if target is not None and target.get("bus") == "scsi":
        # Rendered SCSI disks address controller 0; the VM controller owns it.
        ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    devices.append(disk)
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def _image_chain(image: dict[str, Any]) -> Iterator[OpenedImage]:
    layer: dict[str, Any] | None = image
    while layer is not None:
        yield OpenedImage(filename=layer["filename"], format=layer["format"])
        layer = layer.get("backing-image")


def boot_and_inspect(conn: Any, disk_xml: str) -> list[OpenedImage]:
    """Start a throwaway guest with ``disk_xml``; the images QEMU opened for it.

    The guest is transient (never defined) and auto-destroyed should the
    connection close early, so nothing is left behind on any path.
    """
    name = f"vmdisk-boot-{uuid.uuid4().hex[:12]}"
    flags = libvirt.VIR_DOMAIN_START_AUTODESTROY | libvirt.VIR_DOMAIN_START_VALIDATE
    domain = conn.createXML(probe_domain_xml(disk_xml, name), flags)
    try:
        reply = libvirt_qemu.qemuMonitorCommand(domain, '{"execute": "query-block"}', 0)
    finally:
        with contextlib.suppress(libvirt.libvirtError):  # it may have died on its own
            domain.destroy()
    opened: list[OpenedImage] = []
    for device in json.loads(reply)["return"]:
        if "inserted" in device:
            opened.extend(_image_chain(device["inserted"]["image"]))
    return opened


def boot_and_query(conn: Any, disk_xml: str) -> list[str]:
    """The image file names QEMU opened for ``disk_xml``, top layer first."""
    return [image.filename for image in boot_and_inspect(conn, disk_xml)]


@contextlib.contextmanager
def running_domain(conn: Any, disk_xml: str) -> Iterator[Any]:
    """A transient guest holding ``disk_xml`` while the block runs; destroyed after.

    Tests may destroy it earlier themselves (``domain.destroy()``).
    """
    name = f"vmdisk-boot-{uuid.uuid4().hex[:12]}"
    flags = libvirt.VIR_DOMAIN_START_AUTODESTROY | libvirt.VIR_DOMAIN_START_VALIDATE
    domain = conn.createXML(probe_domain_xml(disk_xml, name), flags)
    try:
        yield domain
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()


def query_block(domain: Any) -> list[dict[str, Any]]:
    """QEMU's own view of the guest's block devices (``query-block``), inserted ones only."""
    reply = libvirt_qemu.qemuMonitorCommand(domain, '{"execute": "query-block"}', 0)
    return [d for d in json.loads(reply)["return"] if "inserted" in d]


def qemu_open_files(domain: Any) -> list[str]:
    """What the domain's QEMU process has open (``/proc/PID/fd`` targets)."""
    pid = int(Path(f"/run/libvirt/qemu/{domain.name()}.pid").read_text().strip())
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            found.append(os.readlink(fd))
    return found
