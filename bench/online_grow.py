"""(g) Growing a disk under a running domain: the engine vs ``virsh blockresize`` alone.

A real libvirtd (``qemu:///system``) runs a small guest on a raw and on a
qcow2 disk the engine made.  The engine's grow is one reconcile with a larger
``spec.size``: find the holder (the domains' live XML), ``virDomainBlockResize``,
re-read the disk.  The baselines grow the same device by the same step with
``virsh blockresize`` (a process, as an administrator would) and with the bare
libvirt-python call.  Each runs RUNS times; the median counts.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path
from typing import Any

from vmdisk.api.vmdisk import VMDisk, VMDiskStatus
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine

from .harness import (
    MemoryLookup,
    MiB,
    Row,
    Stats,
    clocked,
    fmt_s,
    image_disk,
    ratio,
    require_ready,
    sh,
    system_libvirtd,
    timed,
    write_image,
)

RUNS = 7
STEP = 16 * MiB
URI = "qemu:///system"
OVERHEAD = 0.05  # seconds the engine may add to a bare blockResize (holder lookup, re-read)


def run(scratch: Path) -> list[Row]:
    logs = scratch / "libvirtd"
    logs.mkdir()
    with system_libvirtd(logs):
        return _run(scratch)


def _run(scratch: Path) -> list[Row]:
    import libvirt

    images = scratch / "images"
    source = images / "base.raw"
    sha = write_image(source, 64 * MiB, 8 * MiB)
    engine = Engine.build(
        Settings(state_dir=scratch / "state", image_dirs=(images,), libvirt_uri=URI)
    )
    conn = libvirt.open(URI)
    try:
        return [_measure(engine, conn, backend, source, sha) for backend in ("raw", "qcow2")]
    finally:
        engine.close()
        conn.close()


def _measure(engine: Engine, conn: Any, backend: str, source: Path, sha: str) -> Row:
    import libvirt  # only this figure needs the bindings

    lookup = MemoryLookup()
    disk = image_disk(f"grow-{backend}", backend, source.as_uri(), sha, "raw", "64Mi")
    status = engine.reconcile_disk(disk, lookup, None)
    require_ready(status, f"{backend} disk")
    size = int(status.virtual_size or 0)
    domain = conn.createXML(_domain_xml(str(status.libvirt_xml)), 0)
    flags = libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES
    virsh = ["virsh", "-c", URI, "blockresize", domain.name(), "vda"]
    try:
        engine_times, virsh_times, api_times = [], [], []
        for _ in range(RUNS):
            size += STEP
            seconds, status = clocked(
                partial(engine.reconcile_disk, _with(disk, status, size), lookup)
            )
            engine_times.append(seconds)
            require_ready(status, f"{backend} online grow")
            if not status.resized_online or status.virtual_size != size:
                raise RuntimeError(f"{backend}: not grown online to {size}: {status}")
            size += STEP
            virsh_times.append(timed(partial(sh, *virsh, f"{size}B")))
            size += STEP
            api_times.append(timed(partial(domain.blockResize, "vda", size, flags)))
            if domain.blockInfo("vda")[0] != size:
                raise RuntimeError(f"{backend}: QEMU does not report {size} bytes")
            status = status.model_copy(update={"virtual_size": size})
    finally:
        domain.destroy()
        engine.delete_disk(_with(disk, status, size), lookup)
    med_engine = Stats(tuple(engine_times)).median
    med_virsh = Stats(tuple(virsh_times)).median
    med_api = Stats(tuple(api_times)).median
    return Row(
        f"(g) online grow of a {backend} disk under a running domain (+16 MiB)",
        fmt_s(med_engine),
        f"virsh blockresize: {fmt_s(med_virsh)}; libvirt blockResize call: {fmt_s(med_api)}",
        ratio(med_engine, med_virsh),
        f"≤ virsh blockresize, ≤ bare call + {fmt_s(OVERHEAD)}",
        med_engine <= med_virsh and med_engine <= med_api + OVERHEAD,
    )


def _with(disk: VMDisk, status: VMDiskStatus, size: int) -> VMDisk:
    body = disk.model_dump(by_alias=True, exclude_none=True)
    body["spec"]["size"] = str(size)
    body["status"] = status.model_dump(by_alias=True, exclude_none=True)
    return VMDisk.model_validate(body)


def _domain_xml(disk_xml: str) -> str:
    domain = ET.Element("domain", type="kvm" if Path("/dev/kvm").exists() else "qemu")
    ET.SubElement(domain, "name").text = f"vmdisk-bench-{uuid.uuid4().hex[:8]}"
    ET.SubElement(domain, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    devices.append(ET.fromstring(disk_xml))
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")
