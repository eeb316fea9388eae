"""(lvm) An LVM thin disk from a 1 GiB image (256 MiB data) vs bare qemu-img convert.

This kernel has no device-mapper, so the figure runs inside the test VM
(tests/testvm.py; its accelerator is in the row): a VG on a loop device
with a 2 GiB thin pool.  The engine side is the LVM backend making a sparse
disk from the image (lvcreate, activation, the copy, tags); the baseline is
``qemu-img convert -n -O raw`` alone into a thin LV of the same size made
beforehand.  Each runs three times; the median counts.  The pool's
allocation after each says whether the disk stayed sparse.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .harness import GiB, MiB, Row, fmt_s, ratio, write_image

ROOT = Path(__file__).resolve().parent.parent
RUNS = 3
TARGET = 1.5  # the backend's bookkeeping around the copy costs at most half the copy


def run(scratch: Path) -> list[Row]:
    sys.path.insert(0, str(ROOT / "tests"))
    import testvm

    jobdir = Path(tempfile.mkdtemp(prefix="lvm-bench-", dir=scratch))
    result = testvm.run(
        "python -m bench.lvm_thin /testvm/result.json", jobdir=jobdir, timeout=1200.0
    )
    out = jobdir / "result.json"
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"the bench failed in the test VM:\n{result.tail()}")
    figures = json.loads(out.read_text())
    engine, bare = figures["engine"], figures["convert"]
    where = f"in the test VM ({result.accelerator.name}, kernel {figures['kernel']})"
    return [
        Row(
            f"(lvm) thin LVM disk from a 1 GiB raw image with 256 MiB data, {where}, median",
            f"{fmt_s(engine['seconds'])} (pool allocation {engine['allocated_mib']:.0f} MiB)",
            f"qemu-img convert -n into a thin LV: {fmt_s(bare['seconds'])} "
            f"({bare['allocated_mib']:.0f} MiB)",
            ratio(engine["seconds"], bare["seconds"]),
            f"≤ {TARGET}x, allocation ≤ 300 MiB",
            engine["seconds"] <= TARGET * bare["seconds"] and engine["allocated_mib"] <= 300,
        )
    ]


def inside(out: Path) -> None:
    """The measurement, inside the VM."""
    import platform

    from lvmfixtures import make_volume_group
    from vmdisk.backends.base import BaseImage, CreateRequest, DiskRef, FromImage
    from vmdisk.backends.lvm import LvmBackend, LvmParameters
    from vmdisk.host.run import run as host_run

    work = Path(tempfile.mkdtemp(prefix="lvm-bench-", dir="/var/tmp"))
    source = work / "base256.raw"
    sha = write_image(source, GiB, 256 * MiB)
    with make_volume_group(work, 2 * GiB + 256 * MiB) as vg:
        vg.thin_pool(2048)
        backend = LvmBackend(vg.name, lvm=vg.lvm)
        base = BaseImage(f"sha256-{sha}", source, "raw", GiB)

        def allocated_mib(name: str) -> float:
            volume = vg.lvm.volume(vg.name, name)
            assert volume is not None and volume.data_percent is not None
            return volume.size * volume.data_percent / 100 / MiB

        engine, engine_alloc = [], 0.0
        bare, bare_alloc = [], 0.0
        host_run(["sync"])
        for i in range(RUNS):
            ref = DiskRef("bench", f"thin{i}", vg.name, parameters=LvmParameters(thin=True))
            started = time.perf_counter()
            backend.create(ref, CreateRequest(GiB, FromImage(base)))
            engine.append(time.perf_counter() - started)
            engine_alloc = allocated_mib(f"bench_thin{i}")
            backend.delete(ref)

            name = f"bare{i}"
            vg.lvm.create(vg.name, name, GiB, thin_pool="vmdisk-thinpool")
            started = time.perf_counter()
            host_run(["qemu-img", "convert", "-q", "-n", "-f", "raw", "-O", "raw", str(source),
                      f"/dev/{vg.name}/{name}"])  # fmt: skip
            bare.append(time.perf_counter() - started)
            bare_alloc = allocated_mib(name)
            vg.lvm.remove(vg.name, name)
    figures = {
        "kernel": platform.release(),
        "engine": {"seconds": statistics.median(engine), "allocated_mib": engine_alloc},
        "convert": {"seconds": statistics.median(bare), "allocated_mib": bare_alloc},
    }
    out.write_text(json.dumps(figures))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    inside(Path(sys.argv[1]))
