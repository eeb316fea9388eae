"""(d) Download throughput: ImageCache.get of 1 GiB over loopback HTTP vs curl.

The cache's figure includes everything ``get`` does for a new image:
download, sha256 verification, the format safety checks and the rename
into place.  Each client runs seven times after one warm-up, alternating
who goes first; the median rate counts (the cell shows the slowest and
fastest run too, as this figure is noisy on VMs).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vmdisk.api.vmdisk import ImageSource
from vmdisk.config import Settings
from vmdisk.images.cache import ImageCache

from .harness import GiB, MiB, Row, clocked, sh, write_image
from .httpserver import FileServer

RUNS = 7
TARGET = 0.8
IMAGE = "image1g.raw"


def run(scratch: Path) -> list[Row]:
    served = scratch / "served"
    sha = write_image(served / IMAGE, GiB, GiB - MiB, chunk=16 * MiB)
    size = (served / IMAGE).stat().st_size
    times: dict[str, list[float]] = {"engine": [], "curl": []}
    with FileServer(served) as server:
        source = ImageSource(url=server.url(IMAGE), checksum=f"sha256:{sha}", format="raw")

        def engine(i: int) -> Path:
            root = scratch / f"cache{i}"
            cache = ImageCache(root, image_dirs=(), max_virtual_size=Settings().max_virtual_size)
            return cache.get(source, disk_size=None).path

        def curl(i: int) -> Path:
            target = scratch / f"curl{i}.raw"
            sh("curl", "-s", "-o", target, source.url)
            return target

        clients: dict[str, Callable[[int], Path]] = {"engine": engine, "curl": curl}
        _check(curl(-1), size)  # warm-up, not counted
        for i in range(RUNS):
            # Alternate who goes first; start each run with no writeback pending.
            for name in ("engine", "curl") if i % 2 == 0 else ("curl", "engine"):
                os.sync()
                seconds, path = clocked(partial(clients[name], i))
                times[name].append(seconds)
                _check(path, size)
    rates = {k: sorted(size / t / 1e6 for t in v) for k, v in times.items()}
    engine_rate, curl_rate = (statistics.median(rates[k]) for k in ("engine", "curl"))
    return [
        Row(
            "(d) download 1 GiB over loopback HTTP, verified (ImageCache.get)",
            f"{engine_rate:.0f} MB/s {_spread(rates['engine'])}",
            f"curl -s -o: {curl_rate:.0f} MB/s {_spread(rates['curl'])}",
            f"{engine_rate / curl_rate:.2f}x",
            f"≥ {TARGET}x",
            engine_rate >= TARGET * curl_rate,
        )
    ]


def _check(path: Path, size: int) -> None:
    """Fail on a short download; then free the space (cache entries are read-only)."""
    got = path.stat().st_size
    path.unlink()
    if got != size:
        raise RuntimeError(f"{path.name}: {got} bytes downloaded, expected {size}")


def _spread(rates: list[float]) -> str:
    return f"(runs {rates[0]:.0f}-{rates[-1]:.0f})"
