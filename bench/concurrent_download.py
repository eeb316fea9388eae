"""(c) 20 qcow2 disks at once from one uncached image over HTTP.

The engine must fetch the image exactly once, and 20 concurrent disks
should take little longer than one download plus the overlays made one
after another (the baseline, measured into its own fresh state directory).
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

from vmdisk.api.vmdisk import VMDisk, VMDiskStatus
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine

from .harness import (
    LOOPBACK_HOSTS,
    MemoryLookup,
    MiB,
    Row,
    fmt_s,
    image_disk,
    ratio,
    require_ready,
    timed,
    write_image,
)
from .httpserver import FileServer

DISKS = 20
TARGET = 1.3
IMAGE = "image256.raw"


def run(scratch: Path) -> list[Row]:
    served = scratch / "served"
    sha = write_image(served / IMAGE, 256 * MiB, 255 * MiB)
    lookup = MemoryLookup()
    with FileServer(served) as server:
        url = server.url(IMAGE)

        def model(name: str) -> VMDisk:
            return image_disk(name, "qcow2", url, sha, "raw", "1Gi")

        # Baseline: one disk (the download), then the other overlays in turn.
        alone = Engine.build(Settings(state_dir=scratch / "alone", image_hosts=LOOPBACK_HOSTS))

        def one(name: str) -> None:
            require_ready(alone.reconcile_disk(model(name), lookup), name)

        single = timed(partial(one, "d00"))
        rest = sum(timed(partial(one, f"d{i:02d}")) for i in range(1, DISKS))
        before = server.counts(IMAGE)

        engine = Engine.build(
            Settings(state_dir=scratch / "concurrent", image_hosts=LOOPBACK_HOSTS)
        )
        results: list[VMDiskStatus | BaseException] = []
        gate = threading.Barrier(DISKS + 1)

        def worker(i: int) -> None:
            gate.wait()
            try:
                results.append(engine.reconcile_disk(model(f"d{i:02d}"), lookup))
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(DISKS)]
        for t in threads:
            t.start()
        gate.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        after = server.counts(IMAGE)

    for result in results:
        if isinstance(result, BaseException):
            raise result
        require_ready(result, "concurrent disk")
    full = after.full - before.full
    baseline = single + rest
    return [
        Row(
            f"(c) full image downloads, {DISKS} concurrent disks (256 MiB over HTTP)",
            f"{full} ({after.gets - before.gets} GETs)",
            "1",
            "-",
            "exactly 1",
            full == 1,
        ),
        Row(
            f"(c) wall time, {DISKS} concurrent disks from the uncached image",
            fmt_s(wall),
            f"first disk (download) {fmt_s(single)} + {DISKS - 1} overlays {fmt_s(rest)}"
            f" = {fmt_s(baseline)}",
            ratio(wall, baseline),
            f"≤ {TARGET}x",
            wall <= TARGET * baseline,
        ),
    ]
