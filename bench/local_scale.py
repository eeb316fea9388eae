"""(local) Local mode as a user waits for it: whole ``vmdisk`` commands, timed from outside.

- ``vmdisk apply`` / ``vmdisk delete`` of N blank qcow2 disks at N = 100 and
  1,000 (per-disk time at each N), and the no-op re-apply of the same N;
- start-up of ``get``, ``cache list`` and ``--help`` against ``ls -l``;
- 50 qcow2 disks from a cached 1 GiB base in one apply against ``qemu-img
  create -b`` in a shell loop, with ``xargs -P2``, and libvirt's
  ``pool.createXML`` per volume: as a whole command (a Python process that
  connects and makes the 50 volumes, judged like every other row) and as the
  calls alone in an open connection (reported).

Runs of the engine and of its baselines are interleaved; medians with min/max,
and the load average, are printed (the machine may be shared).  The commands
run with bytecode caching on, as an installed package does.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from .harness import GiB, MiB, Row, fmt_s, ratio, sh, system_libvirtd, write_image

VMDISK = Path(sys.executable).with_name("vmdisk")
# vmdisk with every fsync a no-op: a diagnostic only, never a way to run it.  What
# the 50-overlay apply costs beyond it is the price of its durability.
NO_FSYNC = (
    "import os, sys; os.fsync = lambda fd: None; from vmdisk.cli import main; sys.exit(main())"
)
SCALES = (100, 1000)
SCALE_RUNS = 3
STARTUP_RUNS = 7
OVERLAYS = 50
OVERLAY_RUNS = 5
STARTUP_TARGET = 0.150
NOOP_TARGET = 0.05
GROWTH_TARGET = 1.5
XARGS_TARGET = 1.5


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def _spread(samples: Sequence[float], per: int = 1) -> str:
    """median (min-max) of samples divided by ``per``."""
    med = statistics.median(samples) / per
    return f"{fmt_s(med)} ({fmt_s(min(samples) / per)}-{fmt_s(max(samples) / per)})"


def _env(images: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(VMDISK_NODE_NAME="bench", VMDISK_IMAGE_DIRS=str(images))
    return env


def _wall(argv: Sequence[str | Path], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, timeout=1800
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr}")
    return took


def _doc(name: str, spec: Mapping[str, object]) -> dict[str, object]:
    meta = {"name": name, "namespace": "bench"}
    return {"apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDisk", "metadata": meta, "spec": spec}


def _manifest(path: Path, docs: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def run(scratch: Path) -> list[Row]:
    images = scratch / "images"
    images.mkdir()
    env = _env(images)
    _wall([VMDISK, "--help"], env)  # writes the bytecode caches, as an install would have
    rows = _scales(scratch, env)
    rows += _startup(scratch, env)
    rows += _overlays(scratch, images, env)
    return rows


def run_overlays(scratch: Path) -> list[Row]:
    """Only the 50-overlay rows of ``run`` (about a minute instead of ten)."""
    images = scratch / "images"
    images.mkdir()
    env = _env(images)
    _wall([VMDISK, "--help"], env)
    return _overlays(scratch, images, env)


# -- apply / re-apply / delete at N ---------------------------------------------------
def _scales(scratch: Path, env: dict[str, str]) -> list[Row]:
    blank = {"backend": "qcow2", "size": "1Gi", "source": {"blank": {}}}
    files = {
        n: _manifest(scratch / f"blank-{n}.yaml", [_doc(f"d{i}", blank) for i in range(n)])
        for n in SCALES
    }
    times: dict[tuple[str, int], list[float]] = {}
    loads = [_load()]
    for run in range(SCALE_RUNS):
        for n in SCALES:  # interleaved: 100, 1000, 100, 1000, ...
            state = scratch / f"state-{n}-{run}"
            common: list[str | Path] = ["--state-dir", state]
            for verb, argv in (
                ("apply", [VMDISK, "apply", "-f", files[n], *common]),
                ("reapply", [VMDISK, "apply", "-f", files[n], *common]),
                ("delete", [VMDISK, "delete", "-f", files[n], *common]),
            ):
                times.setdefault((verb, n), []).append(_wall(argv, env))
            sh("rm", "-rf", state)
    loads.append(_load())
    small, large = SCALES
    rows = []
    for verb, what in (("apply", "vmdisk apply"), ("delete", "vmdisk delete -f")):
        per = {n: statistics.median(times[(verb, n)]) / n for n in SCALES}
        growth = per[large] / per[small]
        judged = verb == "delete"
        rows.append(
            Row(
                f"(local) {what} of N blank qcow2 disks, whole command, per disk "
                f"({SCALE_RUNS} runs, {' → '.join(loads)})",
                f"N={large}: {_spread(times[(verb, large)], large)}",
                f"N={small}: {_spread(times[(verb, small)], small)}",
                f"{growth:.2f}x",
                f"≤ {GROWTH_TARGET}x (per disk, N={large} vs N={small})" if judged else "report",
                growth <= GROWTH_TARGET if judged else True,
            )
        )
    noop, first = times[("reapply", large)], times[("apply", large)]
    share = statistics.median(noop) / statistics.median(first)
    rows.append(
        Row(
            f"(local) no-op re-apply of {large} unchanged disks, whole command",
            _spread(noop),
            f"first apply: {_spread(first)}",
            f"{share:.3f}x",
            f"≤ {NOOP_TARGET}x",
            share <= NOOP_TARGET,
        )
    )
    return rows


# -- start-up -----------------------------------------------------------------------
def _startup(scratch: Path, env: dict[str, str]) -> list[Row]:
    empty = scratch / "empty-state"
    commands: dict[str, list[str | Path]] = {
        "vmdisk get": [VMDISK, "get", "--state-dir", empty],
        "vmdisk cache list": [VMDISK, "cache", "list", "--state-dir", empty],
        "vmdisk --help": [VMDISK, "--help"],
        "ls -l": ["ls", "-l", scratch],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    load = _load()
    for _ in range(STARTUP_RUNS):
        for key, argv in commands.items():
            times[key].append(_wall(argv, env))
    base = statistics.median(times["ls -l"])
    rows = []
    for key in ("vmdisk get", "vmdisk cache list", "vmdisk --help"):
        med = statistics.median(times[key])
        rows.append(
            Row(
                f"(local) start-up: {key} on an empty state dir ({STARTUP_RUNS} runs, {load})",
                _spread(times[key]),
                f"ls -l: {_spread(times['ls -l'])}",
                ratio(med, base),
                f"≤ {fmt_s(STARTUP_TARGET)}",
                med <= STARTUP_TARGET,
            )
        )
    return rows


# -- 50 qcow2 overlays --------------------------------------------------------------
def _overlays(scratch: Path, images: Path, env: dict[str, str]) -> list[Row]:
    logs = scratch / "libvirtd"
    logs.mkdir()
    with system_libvirtd(logs):  # for the pool.createXML baseline
        return _overlays_measured(scratch, images, env)


def _overlays_measured(scratch: Path, images: Path, env: dict[str, str]) -> list[Row]:
    source = images / "base.raw"
    sha = write_image(source, GiB, 64 * MiB)
    spec = {
        "backend": "qcow2",
        "size": "1Gi",
        "source": {"image": {"url": source.as_uri(), "checksum": f"sha256:{sha}", "format": "raw"}},
    }
    state = scratch / "overlay-state"
    common: list[str | Path] = ["--state-dir", state]
    warm = _manifest(scratch / "warm.yaml", [_doc("warm", spec)])
    _wall([VMDISK, "apply", "-f", warm, *common], env)  # caches the base
    batch = _manifest(scratch / "fifty.yaml", [_doc(f"o{i}", spec) for i in range(OVERLAYS)])
    backing = next(p for p in (state / "cache").glob("sha256-*") if p.suffix != ".json")
    bare = scratch / "bare"
    bare.mkdir()
    create = f"qemu-img create -q -f qcow2 -b {backing} -F raw"
    loop = f"for i in $(seq {OVERLAYS}); do {create} {bare}/l$i.qcow2; done"
    xargs = f"seq {OVERLAYS} | xargs -P2 -I@ {create} {bare}/x@.qcow2"
    libvirt_pool = _libvirt_pool(bare / "pool", backing)

    single = _manifest(scratch / "one.yaml", [_doc("one", spec)])
    times: dict[str, list[float]] = {
        k: [] for k in ("vmdisk", "one", "no fsync", "loop", "xargs", "pool", "pool command")
    }
    load = _load()
    for _ in range(OVERLAY_RUNS):
        times["vmdisk"].append(_wall([VMDISK, "apply", "-f", batch, *common], env))
        _wall([VMDISK, "delete", "-f", batch, *common], env)
        times["one"].append(_wall([VMDISK, "apply", "-f", single, *common], env))
        _wall([VMDISK, "delete", "-f", single, *common], env)
        no_fsync = [sys.executable, "-c", NO_FSYNC, "apply", "-f", batch, *common]
        times["no fsync"].append(_wall(no_fsync, env))
        _wall([VMDISK, "delete", "-f", batch, *common], env)
        for key, script in (("loop", loop), ("xargs", xargs)):
            times[key].append(_wall(["bash", "-c", script]))
            sh("bash", "-c", f"rm -f {bare}/*.qcow2")
        if libvirt_pool is not None:
            calls, command = libvirt_pool[0]()
            times["pool"].append(calls)
            times["pool command"].append(command)
    if libvirt_pool is not None:
        libvirt_pool[1]()
    med = {k: statistics.median(v) / OVERLAYS for k, v in times.items() if v}
    cores = os.cpu_count() or 1
    base = f"loop {_spread(times['loop'], OVERLAYS)}; xargs -P2 {_spread(times['xargs'], OVERLAYS)}"
    rows = [
        Row(
            f"(local) {OVERLAYS} qcow2 disks from a cached 1 GiB base, one vmdisk apply, per disk "
            f"({OVERLAY_RUNS} runs, {load}, {cores} CPUs)",
            _spread(times["vmdisk"], OVERLAYS),
            base,
            f"{ratio(med['vmdisk'], med['xargs'])} of xargs -P2, "
            f"{ratio(med['vmdisk'], med['loop'])} of the loop",
            f"≤ {XARGS_TARGET}x xargs -P2",
            med["vmdisk"] <= XARGS_TARGET * med["xargs"],
        )
    ]
    # What a disk adds beyond the command's start-up and its first disk: the
    # figure start-up work cannot move (reported, not judged).
    beyond = [(a - b) / (OVERLAYS - 1) for a, b in zip(times["vmdisk"], times["one"], strict=True)]
    rows.append(
        Row(
            f"(local) same, each disk beyond the first: (apply of {OVERLAYS} - apply of 1) "
            f"/ {OVERLAYS - 1}, paired runs",
            _spread(beyond),
            f"apply of 1 disk: {_spread(times['one'])}; xargs -P2 per disk "
            f"{_spread(times['xargs'], OVERLAYS)}",
            f"{ratio(statistics.median(beyond), med['xargs'])} of xargs -P2",
            "report",
            True,
        )
    )
    rows.append(
        Row(
            "(local) same, with os.fsync made a no-op in the vmdisk process (diagnostic: "
            "the rest is the price of durability; qemu-img create never fsyncs)",
            _spread(times["no fsync"], OVERLAYS),
            f"xargs -P2 {_spread(times['xargs'], OVERLAYS)}; durable vmdisk "
            f"{_spread(times['vmdisk'], OVERLAYS)}",
            f"{ratio(med['no fsync'], med['xargs'])} of xargs -P2",
            "report",
            True,
        )
    )
    if libvirt_pool is None:
        rows.append(
            Row(
                "(local) same vs libvirt pool.createXML",
                "error: qemu:///system does not answer",
                "",
                "",
                "",
                None,
            )
        )
    else:
        baselines = {  # the judged one is a whole command, as vmdisk's is
            "pool command": "each a whole command: python, bindings, connection, 50 calls",
            "pool": "the calls alone, in an open connection (vmdisk still pays its start-up)",
        }
        rows += [
            Row(
                "(local) same vs libvirt pool.createXML (dir pool, qcow2 volume with "
                f"backingStore), {how}",
                _spread(times["vmdisk"], OVERLAYS),
                f"{key}: {_spread(times[key], OVERLAYS)}",
                ratio(med["vmdisk"], med[key]),
                "< 1.0x" if key == "pool command" else "report",
                med["vmdisk"] < med[key] if key == "pool command" else True,
            )
            for key, how in baselines.items()
        ]
    return rows


def _libvirt_pool(
    directory: Path, backing: Path
) -> tuple[Callable[[], tuple[float, float]], Callable[[], None]] | None:
    """Seconds for OVERLAYS volumes made (then deleted) through a libvirt dir pool, as
    calls in this process and as a whole command; a closer."""
    try:
        import libvirt

        conn = libvirt.open("qemu:///system")
    except Exception:
        return None
    directory.mkdir()
    name = f"vmdisk-bench-{os.getpid()}"
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>", 0
    )

    def volume(i: int) -> str:
        return (
            f"<volume><name>v{i}.qcow2</name><capacity unit='bytes'>{GiB}</capacity>"
            "<target><format type='qcow2'/></target>"
            f"<backingStore><path>{backing}</path><format type='raw'/></backingStore></volume>"
        )

    # The same calls as a command a user runs: interpreter, bindings, connection.
    volumes = [volume(i) for i in range(OVERLAYS)]
    script = (
        "import libvirt\n"
        f"pool = libvirt.open('qemu:///system').storagePoolLookupByName({name!r})\n"
        f"for xml in {volumes!r}:\n"
        "    pool.createXML(xml, 0)\n"
    )

    def make() -> tuple[float, float]:
        start = time.perf_counter()
        made = [pool.createXML(volume(i), 0) for i in range(OVERLAYS)]
        calls = time.perf_counter() - start
        for vol in made:
            vol.delete(0)
        command = _wall([sys.executable, "-c", script])
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        return calls, command

    def close() -> None:
        pool.destroy()  # a transient pool: gone with it
        conn.close()

    return make, close
