"""Run the figures, print the table and write it to bench/results/latest.md.

``python -m bench`` runs every figure; ``python -m bench a c`` runs a subset and
writes bench/results/partial-a-c.md instead, leaving the full run's table alone.
A part of a figure (``overlays``: the 50-overlay rows of ``local``) runs only
when named.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import vmdisk

from . import (
    concurrent_download,
    decompress_speed,
    download_speed,
    engine_qcow2,
    local_scale,
    lvm_thin,
    online_grow,
    operator_fleet,
    operator_latency,
    operator_scale,
    raw_copy,
    rbd_clone,
    registry_pull,
)
from .harness import Row, fs_type, scratch_dir, sh, table

FIGURES: dict[str, tuple[str, Callable[[Path], list[Row]]]] = {
    "a": ("50 qcow2 disks from a cached base", engine_qcow2.run),
    "b": ("raw disk copy, native fs and xfs reflink", raw_copy.run),
    "c": ("20 concurrent disks, one download", concurrent_download.run),
    "d": ("download throughput vs curl and wget", download_speed.run),
    "z": ("decompressing download (.xz, .zst) vs curl | xz -d / zstd -d", decompress_speed.run),
    "e": ("the operator at scale against a real kube-apiserver", operator_scale.run),
    "f": ("kubectl apply to Ready, one disk at a time", operator_latency.run),
    "h": ("a fleet of agents watching 1,000 VMDisks of one node", operator_fleet.run),
    "local": ("local mode as a user waits: apply/delete at N, start-up, overlays", local_scale.run),
    "overlays": ("the 50-overlay rows of (local) alone", local_scale.run_overlays),
    "g": ("online grow under a running domain vs virsh blockresize", online_grow.run),
    "rbd": ("20 rbd disks: COW clones vs full imports", rbd_clone.run),
    "lvm": ("thin LVM disk from an image vs qemu-img convert, in the test VM", lvm_thin.run),
    "oci": ("registry pull of a 256 MiB containerDisk vs skopeo copy", registry_pull.run),
}
# Parts of another figure: run only when named, never by a full run.
PARTS = frozenset({"overlays"})
RESULTS_DIR = Path(__file__).parent / "results"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup of mounts and dirs


def _machine(scratch: Path) -> list[str]:
    qemu = sh("qemu-img", "--version").splitlines()[0]
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {len(os.sched_getaffinity(0))} CPUs (nproc), {_cpu_model()}, "
        f"kernel {platform.release()}",
        f"- state dir filesystem: {fs_type(scratch)} ({scratch.parent})",
        f"- vmdisk {vmdisk.__version__}, Python {platform.python_version()}, {qemu}",
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("figures", nargs="*", metavar="FIGURE", help="a b c d [all]")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.figures) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {' '.join(unknown)}; choose from {' '.join(FIGURES)}")
    every = [key for key in FIGURES if key not in PARTS]
    chosen = [key for key in FIGURES if key in args.figures] or every
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)

    rows: list[Row] = []
    started = time.monotonic()
    with scratch_dir() as scratch:
        header = _machine(scratch)
        for key in chosen:
            title, run = FIGURES[key]
            print(f"bench ({key}) {title} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            workdir = scratch / key
            workdir.mkdir()
            try:
                rows += run(workdir)
            except Exception as exc:
                traceback.print_exc()
                rows.append(Row(f"({key}) {title}", f"error: {exc}", "", "", "", None))
            print(f"bench ({key}) done in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    header.append(f"- figures: {' '.join(chosen)}; bench runtime {time.monotonic() - started:.0f}s")
    report = "\n".join(["# vmdisk bench", "", *header, "", table(rows), ""])
    print(report)
    full = chosen == every
    results = RESULTS_DIR / ("latest.md" if full else f"partial-{'-'.join(chosen)}.md")
    RESULTS_DIR.mkdir(exist_ok=True)
    tmp = results.with_name(results.name + ".tmp")
    tmp.write_text(report)
    tmp.replace(results)
    print(f"wrote {results}", file=sys.stderr)
    return 1 if any(r.passed is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
