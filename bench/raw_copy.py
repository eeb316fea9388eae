"""(b) A raw disk from a 1 GiB base holding 256 MiB: engine vs cp and qemu-img convert.

Measured on the scratch directory's filesystem and on a loop-mounted,
reflink-capable xfs, where the engine should clone extents instead of
copying.  Each method runs three times; the median counts.  The sources
of the baselines are the engine's own cache entry, on the same filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vmdisk.api.vmdisk import VMDisk
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine

from .harness import (
    GiB,
    MemoryLookup,
    MiB,
    Row,
    Stats,
    fmt_s,
    free_bytes,
    fs_type,
    image_disk,
    loop_xfs,
    ratio,
    require_ready,
    sh,
    timed,
    write_image,
)

RUNS = 5
INSTANT = 0.1  # seconds: "near-instant" for a reflinked 1 GiB disk


def run(scratch: Path) -> list[Row]:
    images = scratch / "images"
    source = images / "base256.raw"
    sha = write_image(source, GiB, 256 * MiB)
    rows = _measure(scratch / "native", source, sha, reflink_expected=False)
    with loop_xfs(scratch / "xfs.img", scratch / "xfs", 3 * GiB) as mnt:
        rows += _measure(mnt, source, sha, reflink_expected=True)
    return rows


def _measure(workdir: Path, source: Path, sha: str, *, reflink_expected: bool) -> list[Row]:
    workdir.mkdir(parents=True, exist_ok=True)
    fstype = fs_type(workdir)
    engine = Engine.build(Settings(state_dir=workdir / "state", image_dirs=(source.parent,)))
    lookup = MemoryLookup()

    def model(name: str) -> VMDisk:
        return image_disk(name, "raw", source.as_uri(), sha, "raw", "1Gi")

    def disk(name: str) -> None:
        require_ready(engine.reconcile_disk(model(name), lookup, None), f"raw disk {name}")

    disk("warmup")  # caches the base image
    engine.delete_disk(model("warmup"), lookup)
    cached = engine.cache.lookup(f"sha256-{sha}")
    assert cached is not None
    out = workdir / "out"
    out.mkdir()

    base, copy = cached.path, out / "copy.raw"
    baselines: dict[str, Callable[[], object]] = {
        "cp": lambda: sh("cp", "--sparse=always", base, copy),
        "convert": lambda: sh("qemu-img", "convert", "-f", "raw", "-O", "raw", base, copy),
        # Durable like the engine's disk: the data and the new directory entry.
        "cp+sync": lambda: (sh("cp", "--sparse=always", base, copy), sh("sync", copy, out)),
        "convert+sync": lambda: (
            sh("qemu-img", "convert", "-f", "raw", "-O", "raw", base, copy),
            sh("sync", copy, out),
        ),
    }
    times: dict[str, list[float]] = {"engine": [], **{k: [] for k in baselines}}
    engine_used = []
    for i in range(RUNS):
        os.sync()  # no writeback left over from the previous step
        before = free_bytes(workdir)
        times["engine"].append(timed(partial(disk, f"r{i}")))
        engine_used.append(before - free_bytes(workdir))
        engine.delete_disk(model(f"r{i}"), lookup)
        for key, command in baselines.items():
            os.sync()
            times[key].append(timed(command))
            copy.unlink()

    med = {k: Stats(tuple(v)).median for k, v in times.items()}
    spread = {k: f"{fmt_s(med[k])} ({fmt_s(min(v))}-{fmt_s(max(v))})" for k, v in times.items()}
    used = max(engine_used)
    shared = used < 16 * MiB
    figure = f"(b) raw disk, 1 GiB base with 256 MiB data, {fstype}"
    if reflink_expected:
        figure += " loop mount, reflink=1"
    note = f" (new space used: {used // MiB} MiB{', reflinked' if shared else ''})"
    rows = []
    # The engine fsyncs a disk's data, its record and the directories before
    # the disk counts as made (a crash must never leave a "complete" disk with
    # unwritten data; strace shows it in tests/test_durability.py); the bare
    # commands do not.  Judge against both: as given, and made durable the
    # same way (fsync of the copy and of its directory).
    for label, keys in (("as given", ("cp", "convert")), ("+ fsync", ("cp+sync", "convert+sync"))):
        fastest = min(med[k] for k in keys)
        baseline = "; ".join(
            f"{k.replace('+sync', ' + fsync file, dir')}: {spread[k]}" for k in keys
        )
        goal = f"≤ faster baseline ({label})"
        passed = med["engine"] <= fastest
        if reflink_expected:
            goal += f", < {fmt_s(INSTANT)}"
            passed = passed and med["engine"] < INSTANT
        rows.append(
            Row(
                f"{figure}, baselines {label}",
                spread["engine"]
                + note
                + f", {RUNS} interleaved runs, load {os.getloadavg()[0]:.1f}",
                baseline,
                ratio(med["engine"], fastest),
                goal,
                passed,
            )
        )
    return rows
