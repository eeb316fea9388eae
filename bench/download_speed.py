"""(d) Download throughput: ImageCache.get of 1 GiB over loopback HTTP vs curl and wget.

The cache's figure includes everything ``get`` does for a new image:
download, sha256 verification (in the same pass), the format safety
checks, the fsync and the rename into place; ``curl -o`` and ``wget -O``
only write the file.  All three fetch from the same server process, seven
runs each after one warm-up, interleaved (the order rotates every run) and
each started with no writeback pending; the cells show the median rate,
the slowest and fastest run, and the load average around the runs (the
machine is shared).
"""

from __future__ import annotations

import os
import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from vmdisk.api.vmdisk import ImageSource
from vmdisk.config import Settings
from vmdisk.images.cache import ImageCache
from vmdisk.images.policy import SourcePolicy

from .harness import LOOPBACK_HOSTS, GiB, MiB, Row, clocked, sh, write_image
from .httpserver import FileServer

RUNS = 7
TARGET = 0.9
IMAGE = "image1g.raw"
LOOPBACK = SourcePolicy(allowed_hosts=LOOPBACK_HOSTS)


def run(scratch: Path) -> list[Row]:
    served = scratch / "served"
    sha = write_image(served / IMAGE, GiB, GiB - MiB, chunk=16 * MiB)
    size = (served / IMAGE).stat().st_size
    with FileServer(served) as server:
        source = ImageSource(url=server.url(IMAGE), checksum=f"sha256:{sha}", format="raw")

        def engine(i: int) -> Path:
            cache = ImageCache(
                scratch / f"cache{i}", policy=LOOPBACK, max_virtual_size=Settings().max_virtual_size
            )
            return cache.get(source, disk_size=None).path

        def curl(i: int) -> Path:
            target = scratch / f"curl{i}.raw"
            sh("curl", "-s", "-o", target, source.url)
            return target

        def wget(i: int) -> Path:
            target = scratch / f"wget{i}.raw"
            sh("wget", "-q", "-O", target, source.url)
            return target

        clients: dict[str, Callable[[int], Path]] = {"engine": engine, "curl": curl, "wget": wget}
        got = interleaved(clients, size, RUNS)
    engine_rate, curl_rate, wget_rate = (statistics.median(got.rates[k]) for k in clients)
    return [
        Row(
            "(d) download 1 GiB over loopback HTTP, sha256 verified in the same pass "
            f"(ImageCache.get, fsync and checks included); load {got.load} on 2 shared cores",
            got.cell("engine"),
            f"curl -o: {got.cell('curl')}; wget -O: {got.cell('wget')}",
            f"{engine_rate / curl_rate:.2f}x curl, {engine_rate / wget_rate:.2f}x wget",
            f"≥ {TARGET}x curl",
            engine_rate >= TARGET * curl_rate,
        )
    ]


@dataclass(frozen=True)
class Measured:
    rates: dict[str, list[float]]  # MB/s per run, sorted
    cpu: dict[str, float]  # median CPU seconds per run (user + system, children included)
    load: str  # the 1-minute load average seen around the runs

    def cell(self, name: str) -> str:
        rates = self.rates[name]
        return (
            f"{statistics.median(rates):.0f} MB/s (min {rates[0]:.0f}, max {rates[-1]:.0f}; "
            f"CPU {self.cpu[name]:.2f} s)"
        )


def interleaved(
    clients: dict[str, Callable[[int], Path]], size: int, runs: int, *, produced: int | None = None
) -> Measured:
    """Each client ``runs`` times, the order rotating; rates in fetched bytes per second."""
    names = list(clients)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    loads = [os.getloadavg()[0]]
    for name in names:  # warm-up, not counted
        check(clients[name](-1), produced or size)
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            os.sync()
            before = _cpu()
            seconds, path = clocked(partial(clients[name], i))
            cpus[name].append(_cpu() - before)
            times[name].append(seconds)
            check(path, produced or size)
        loads.append(os.getloadavg()[0])
    return Measured(
        {k: sorted(size / t / 1e6 for t in v) for k, v in times.items()},
        {k: statistics.median(v) for k, v in cpus.items()},
        f"{min(loads):.1f}-{max(loads):.1f}",
    )


def _cpu() -> float:
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def check(path: Path, size: int) -> None:
    """Fail on a short download; then free the space (cache entries are read-only)."""
    got = path.stat().st_size
    path.unlink()
    if got != size:
        raise RuntimeError(f"{path.name}: {got} bytes, expected {size}")
