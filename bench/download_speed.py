"""(d) Download throughput: ImageCache.get of 1 GiB over loopback HTTP vs curl.

The cache's figure includes everything ``get`` does for a new image:
download, sha256 verification, the format safety checks and the rename
into place.  Each client runs three times, alternating; the median counts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vmdisk.api.vmdisk import ImageSource
from vmdisk.config import Settings
from vmdisk.images.cache import ImageCache

from .harness import GiB, MiB, Row, Stats, sh, timed, write_image
from .httpserver import FileServer

RUNS = 3
TARGET = 0.8
IMAGE = "image1g.raw"


def run(scratch: Path) -> list[Row]:
    served = scratch / "served"
    sha = write_image(served / IMAGE, GiB, GiB - MiB, chunk=16 * MiB)
    size = (served / IMAGE).stat().st_size
    source = ImageSource(url="http://placeholder/", checksum=f"sha256:{sha}", format="raw")
    engine_times, curl_times = [], []
    with FileServer(served) as server:
        source = source.model_copy(update={"url": server.url(IMAGE)})
        for i in range(RUNS):
            root = scratch / f"cache{i}"
            cache = ImageCache(root, image_dirs=(), max_virtual_size=Settings().max_virtual_size)
            os.sync()  # no writeback left over from the previous step
            engine_times.append(timed(lambda c=cache: c.get(source, disk_size=None)))
            if (root / f"sha256-{sha}").stat().st_size != size:
                raise RuntimeError("ImageCache.get produced a file of the wrong size")
            shutil.rmtree(root)
            target = scratch / "curl.raw"
            os.sync()
            curl_times.append(timed(lambda t=target: sh("curl", "-s", "-o", t, source.url)))
            if target.stat().st_size != size:
                raise RuntimeError("curl produced a file of the wrong size")
            target.unlink()
    engine_rate = size / Stats(tuple(engine_times)).median / 1e6
    curl_rate = size / Stats(tuple(curl_times)).median / 1e6
    return [
        Row(
            "(d) download 1 GiB over loopback HTTP, verified (ImageCache.get)",
            f"{engine_rate:.0f} MB/s",
            f"curl -s -o: {curl_rate:.0f} MB/s",
            f"{engine_rate / curl_rate:.2f}x",
            f"≥ {TARGET}x",
            engine_rate >= TARGET * curl_rate,
        )
    ]
