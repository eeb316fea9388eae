"""(a) 50 qcow2 disks from one cached 1 GiB base: engine vs a bare ``qemu-img create``."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine

from .harness import (
    GiB,
    MemoryLookup,
    MiB,
    Row,
    Stats,
    fmt_s,
    image_disk,
    ratio,
    require_ready,
    sh,
    timed,
    write_image,
)

DISKS = 50
TARGET = 1.5


def run(scratch: Path) -> list[Row]:
    """Time the engine and the bare command per disk, interleaved to share any noise."""
    images = scratch / "images"
    source = images / "base.raw"
    sha = write_image(source, GiB, 64 * MiB)
    engine = Engine.build(Settings(state_dir=scratch / "state", image_dirs=(images,)))
    lookup = MemoryLookup()

    def disk(name: str) -> None:
        model = image_disk(name, "qcow2", source.as_uri(), sha, "raw", "1Gi")
        require_ready(engine.reconcile_disk(model, lookup, None), f"qcow2 disk {name}")

    disk("warmup")  # caches the base image
    cached = engine.cache.lookup(f"sha256-{sha}")
    assert cached is not None
    bare_dir = scratch / "bare"
    bare_dir.mkdir()
    backing = cached.path

    def qemu_img_create(overlay: Path) -> None:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", overlay)

    engine_times, bare_times = [], []
    for i in range(DISKS):
        engine_times.append(timed(partial(disk, f"d{i:02d}")))
        bare_times.append(timed(partial(qemu_img_create, bare_dir / f"o{i:02d}.qcow2")))
    eng, bare = Stats(tuple(engine_times)), Stats(tuple(bare_times))
    return [
        Row(
            f"(a) qcow2 disk from cached 1 GiB base, per disk ({DISKS} disks), median",
            fmt_s(eng.median),
            f"qemu-img create -b: {fmt_s(bare.median)}",
            ratio(eng.median, bare.median),
            f"≤ {TARGET}x",
            eng.median <= TARGET * bare.median,
        ),
        Row(
            "(a) same, p90",
            fmt_s(eng.p90),
            f"qemu-img create -b: {fmt_s(bare.p90)}",
            ratio(eng.p90, bare.p90),
            f"≤ {TARGET}x",
            eng.p90 <= TARGET * bare.p90,
        ),
    ]
