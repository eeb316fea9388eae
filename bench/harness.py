"""Shared bench plumbing: timing, statistics, scratch space, test images, the table."""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from vmdisk.api.snapshot import DiskSnapshot
from vmdisk.api.vmdisk import VMDisk, VMDiskStatus

T = TypeVar("T")
TESTS = Path(__file__).resolve().parent.parent / "tests"
MiB = 1024**2
GiB = 1024**3
SCRATCH_PARENT = Path(os.environ.get("VMDISK_BENCH_DIR", "/var/tmp"))
# The bench's image servers listen on loopback, which no image source reaches unless allowed.
LOOPBACK_HOSTS = ("127.0.0.1/32",)


# -- timing ---------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (monotonic clock)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def clocked(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds one call of ``fn`` takes, and what it returned."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in seconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        if len(self.samples) < 2:
            return self.samples[0]
        return statistics.quantiles(self.samples, n=10, method="inclusive")[-1]


def sh(*argv: str | Path) -> str:
    """Run a command (no shell), fail loudly, return its stdout."""
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def fmt_s(seconds: float) -> str:
    """A duration for the table: ms below one second."""
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# -- the result table -------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One measured figure with its baseline(s), measured in the same run."""

    figure: str
    engine: str
    baseline: str
    ratio: str
    target: str
    passed: bool | None  # None: not judged (error)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table."""
    header = ["figure", "engine", "baseline", "ratio", "target", "result"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        verdict = {True: "pass", False: "**FAIL**", None: "error"}[r.passed]
        cells = [r.figure, r.engine, r.baseline, r.ratio, r.target, verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# -- scratch space and filesystems ----------------------------------------------------
def fs_type(path: Path) -> str:
    """Filesystem type holding ``path`` (findmnt, e.g. ext4, xfs, tmpfs)."""
    return sh("findmnt", "-n", "-o", "FSTYPE", "-T", path).strip()


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A fresh directory under /var/tmp (never tmpfs), removed afterwards."""
    SCRATCH_PARENT.mkdir(parents=True, exist_ok=True)
    if fs_type(SCRATCH_PARENT) == "tmpfs":
        raise RuntimeError(f"{SCRATCH_PARENT} is tmpfs; set VMDISK_BENCH_DIR to a disk directory")
    path = Path(tempfile.mkdtemp(prefix="vmdisk-bench-", dir=SCRATCH_PARENT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def loop_xfs(image: Path, mountpoint: Path, size: int) -> Iterator[Path]:
    """A reflink-capable xfs on a loop device, mounted at ``mountpoint``; torn down after.

    Teardown finds the mount and the loop device from the system, not from
    local variables, so an interrupt between any two steps leaks nothing.
    """
    try:
        with open(image, "wb") as handle:
            handle.truncate(size)
        sh("mkfs.xfs", "-q", "-m", "reflink=1", image)
        mountpoint.mkdir(parents=True, exist_ok=True)
        device = sh("losetup", "--find", "--show", image).strip()
        sh("mount", "-t", "xfs", device, mountpoint)
        yield mountpoint
    finally:
        _teardown(image, mountpoint)


def _teardown(image: Path, mountpoint: Path) -> None:
    try:
        if os.path.ismount(mountpoint):
            sh("umount", mountpoint)
    finally:
        if image.exists():
            for line in sh("losetup", "--associated", image).splitlines():
                sh("losetup", "--detach", line.split(":", 1)[0])
            image.unlink()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- test images ----------------------------------------------------------------------
def write_image(path: Path, size: int, data: int, *, chunk: int = 4 * MiB) -> str:
    """A sparse raw file of ``size`` bytes with ``data`` random bytes spread in chunks.

    The first MiB stays zero so no format probe mistakes the random bytes for
    a partition table.  Returns the file's sha256 hex digest.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(max(16 * MiB, 2 * chunk))
    count = max(1, data // chunk)
    stride = (size - MiB) // count
    with open(path, "wb") as out:
        out.truncate(size)
        for i in range(count):
            offset = MiB + i * stride
            start = (offset * 7) % (len(block) - chunk)
            out.seek(offset)
            out.write(block[start : start + chunk])
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# -- driving the engine -----------------------------------------------------------------
class MemoryLookup:
    """The engine's Lookup with nothing in it: image disks need no other objects."""

    def get_disk(self, namespace: str, name: str) -> VMDisk | None:
        return None

    def get_snapshot(self, namespace: str, name: str) -> DiskSnapshot | None:
        return None

    def snapshots_of(self, namespace: str, disk: str) -> list[DiskSnapshot]:
        return []

    def disks_from(self, namespace: str, kind: str, name: str) -> list[VMDisk]:
        return []

    def get_class(self, name: str) -> None:
        return None  # the built-in classes (raw, qcow2, ploop) apply

    def list_classes(self) -> list[Any]:
        return []


def image_disk(name: str, backend: str, url: str, sha256: str, fmt: str, size: str) -> VMDisk:
    """A VMDisk model made from an image, as the API server would hand it over."""
    return VMDisk.model_validate(
        {
            "metadata": {"name": name, "namespace": "bench", "generation": 1},
            "spec": {
                "backend": backend,
                "size": size,
                "source": {"image": {"url": url, "checksum": f"sha256:{sha256}", "format": fmt}},
            },
        }
    )


def require_ready(status: VMDiskStatus, what: str) -> None:
    """Fail the figure when the engine did not produce a Ready disk."""
    if status.phase != "Ready":
        detail = "; ".join(f"{c.reason}: {c.message}" for c in status.conditions)
        raise RuntimeError(f"{what}: phase {status.phase} ({detail})")


# -- a real libvirtd -----------------------------------------------------------------
@contextmanager
def system_libvirtd(workdir: Path) -> Iterator[None]:
    """The suite's libvirtd on ``qemu:///system`` (tests/libvirtd.py), started if none answers."""
    sys.path.insert(0, str(TESTS))
    from libvirtd import system_libvirtd as running

    with running(workdir):
        yield


# -- the real API server -------------------------------------------------------------
@contextmanager
def real_api_server(workdir: Path, namespace: str = "bench") -> Iterator[Any]:
    """The suite's etcd + kube-apiserver (tests/apiserver.py, newest version), started here.

    Yields the suite's admin client (``Kube``) for ``namespace``; its ``server``
    has the agent's kubeconfig (the chart's ServiceAccount), the audit log and
    the server processes (``server.procs``: etcd, then kube-apiserver).
    """
    sys.path.insert(0, str(TESTS))
    from apiserver import Kube, KubeApiServer, kube_versions

    server = KubeApiServer(kube_versions()[-1], workdir)
    try:
        server.start()
        server.kubectl("create", "namespace", namespace)
        client = Kube(server, namespace)
        try:
            yield client
        finally:
            client.close()
    finally:
        server.stop()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def utc_now() -> str:
    """Now, as the audit log writes its timestamps (RFC 3339, microseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
