"""(oci) Registry pull: ImageCache.get of a 256 MiB containerDisk vs ``skopeo copy`` to a dir.

One real docker-registry on loopback holds one image whose single layer
carries ``disk/disk.raw``, 256 MiB with 192 MiB of random data (skopeo gzips
the layer on push, as registries usually hold them).  The cache's figure is a
new pull into an empty cache: manifest, the blob streamed through gunzip and
the tar reader with its digest verified on the way, the disk file written
once, the image safety checks and placing it.  ``skopeo copy docker://...
dir:DIR`` fetches and verifies the same blob (still gzip'd) and the config.  Runs alternate who
goes first; the median counts, the cell shows the fastest and slowest run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vmdisk.api.vmdisk import ImageSource
from vmdisk.config import Settings
from vmdisk.images.cache import ImageCache
from vmdisk.images.policy import SourcePolicy

from .harness import LOOPBACK_HOSTS, TESTS, MiB, Row, clocked, sh, write_image

RUNS = 5
SIZE = 256 * MiB
TARGET = 0.5  # we also gunzip, hash the disk file and run the safety checks


def run(scratch: Path) -> list[Row]:
    sys.path.insert(0, str(TESTS))
    from registry import OciLayout, Registry, layer_tar  # the tests' real registry fixture

    raw = scratch / "disk.raw"
    write_image(raw, SIZE, 192 * MiB, chunk=16 * MiB)
    layout = OciLayout(scratch / "layout")
    layout.tag("t", layout.image(layer_tar({"disk/disk.raw": raw.read_bytes()})))
    raw.unlink()
    times: dict[str, list[float]] = {"engine": [], "skopeo": []}
    with Registry(scratch / "registry") as registry:
        registry.push(layout, "t", "bench/disk:v1")
        policy = SourcePolicy(allowed_hosts=LOOPBACK_HOSTS, plain_http_registries=(registry.host,))
        source = ImageSource(url=registry.url("bench/disk:v1"))

        def engine(i: int) -> Path:
            root = scratch / f"cache{i}"
            cache = ImageCache(root, policy=policy, max_virtual_size=Settings().max_virtual_size)
            cache.get(source, disk_size=None)
            return root

        def skopeo(i: int) -> Path:
            target = scratch / f"skopeo{i}"
            sh(
                "skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                f"docker://{registry.host}/bench/disk:v1", f"dir:{target}",
            )  # fmt: skip
            return target

        clients: dict[str, Callable[[int], Path]] = {"engine": engine, "skopeo": skopeo}
        shutil.rmtree(skopeo(-1))  # warm-up, not counted
        for i in range(RUNS):
            for name in ("engine", "skopeo") if i % 2 == 0 else ("skopeo", "engine"):
                os.sync()
                seconds, path = clocked(partial(clients[name], i))
                times[name].append(seconds)
                shutil.rmtree(path)
    rates = {k: sorted(SIZE / t / 1e6 for t in v) for k, v in times.items()}
    engine_rate, skopeo_rate = (statistics.median(rates[k]) for k in ("engine", "skopeo"))
    load = os.getloadavg()[0]
    return [
        Row(
            f"(oci) pull a 256 MiB containerDisk from a loopback registry (load {load:.1f})",
            f"{engine_rate:.0f} MB/s {_spread(rates['engine'])}",
            f"skopeo copy to dir: {skopeo_rate:.0f} MB/s {_spread(rates['skopeo'])}",
            f"{engine_rate / skopeo_rate:.2f}x",
            f"≥ {TARGET}x",
            engine_rate >= TARGET * skopeo_rate,
        )
    ]


def _spread(rates: list[float]) -> str:
    return f"(runs {rates[0]:.0f}-{rates[-1]:.0f})"
