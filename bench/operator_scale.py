"""(e) The operator at scale: N VMDisks applied at once to a real `vmdisk run` agent
talking to the suite's real etcd + kube-apiserver (tests/apiserver.py), logged in
as the chart's ServiceAccount, qcow2 from one cached base.

Reports time until all Ready, per-disk latency, the agent's API requests per
disk (from the server's audit log), the agent's peak RSS, and CPU time (from
/proc) of the agent (handlers + engine), kube-apiserver and etcd.  Baselines,
measured in the same run: the engine alone making the same disks in one
process, and the bare `qemu-img create -b` floor.

200 disks by default; ``VMDISK_BENCH_SCALE="200 1000"`` adds 1000 (several
minutes on a 2-core machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine

from .harness import (
    MemoryLookup,
    MiB,
    Row,
    fmt_s,
    image_disk,
    process_cpu,
    real_api_server,
    require_ready,
    sh,
    utc_now,
    write_image,
)

COUNTS = tuple(int(n) for n in os.environ.get("VMDISK_BENCH_SCALE", "200").split())


def _peak_rss(pid: int, field: str = "VmHWM") -> int:
    """The process's peak resident memory (or ``field``, e.g. VmRSS: now), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _manifest(name: str, url: str, sha: str) -> dict[str, Any]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": name},  # the bench namespace (Kube.create)
        "spec": {
            "nodeName": "bench-node",
            "backend": "qcow2",
            "size": "64Mi",
            "source": {"image": {"url": url, "checksum": f"sha256:{sha}", "format": "raw"}},
        },
    }


def _scale(scratch: Path, count: int, url: str, sha: str, images: Path) -> dict[str, Any]:
    state = scratch / f"state-{count}"
    warm = Engine.build(Settings(state_dir=state, image_dirs=(images,)))
    require_ready(
        warm.reconcile_disk(
            image_disk("warmup", "qcow2", url, sha, "raw", "64Mi"), MemoryLookup(), None
        ),
        "warm-up disk",
    )  # the base is cached before the clock starts
    with real_api_server(scratch / f"kube-{count}") as kube:
        server = kube.server
        env = {
            **os.environ,
            "KUBECONFIG": str(server.agent_kubeconfig),  # the chart's ServiceAccount
            "VMDISK_IMAGE_DIRS": str(images),
        }
        argv = [sys.executable, "-m", "vmdisk.cli", "run", "--node", "bench-node"]
        argv += ["--state-dir", str(state), "--workers", "4"]
        log = open(scratch / f"agent-{count}.log", "wb")  # noqa: SIM115 - the child owns it
        agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            time.sleep(3)  # let the agent log in and start its watches
            since = utc_now()
            servers = [p.pid for p in server.procs]  # etcd, kube-apiserver
            cpu_server0 = [process_cpu(pid) for pid in servers]
            cpu_agent0 = process_cpu(agent.pid)
            created: dict[str, float] = {}
            ready: dict[str, float] = {}
            start = time.monotonic()
            for i in range(count):
                name = f"d{i:04d}"
                kube.create(_manifest(name, url, sha))
                created[name] = time.monotonic()
            while len(ready) < count and time.monotonic() - start < 900:
                for obj in kube.list("vmdisks"):
                    name = obj["metadata"]["name"]
                    if name not in ready and (obj.get("status") or {}).get("phase") == "Ready":
                        ready[name] = time.monotonic()
                time.sleep(0.2)
            wall = max(ready.values()) - start if len(ready) == count else float("nan")
            latencies = [ready[n] - created[n] for n in ready]
            pairs = zip(servers, cpu_server0, strict=True)
            cpu_server = [process_cpu(pid) - c0 for pid, c0 in pairs]
            agent_cpu = process_cpu(agent.pid) - cpu_agent0
            rss = _peak_rss(agent.pid)
            rss_ready = _peak_rss(agent.pid, "VmRSS")
            # Deletion of them all at once, until the API server has none left.
            time.sleep(2)  # the last status patches settle
            deleting = utc_now()
            cpu_agent1 = process_cpu(agent.pid)
            t0 = time.monotonic()
            for name in created:
                kube.delete("vmdisks", name)
            while kube.list("vmdisks") and time.monotonic() - t0 < 900:
                time.sleep(0.2)
            delete_wall = time.monotonic() - t0 if not kube.list("vmdisks") else float("nan")
            delete_cpu = process_cpu(agent.pid) - cpu_agent1
            rss_after_delete = _peak_rss(agent.pid, "VmRSS")
        finally:
            agent.terminate()
            agent.wait(timeout=30)
        text = (scratch / f"agent-{count}.log").read_text(errors="replace")
        if keep := os.environ.get("VMDISK_BENCH_LOGS"):  # for a look at what the agent did
            shutil.copy(scratch / f"agent-{count}.log", Path(keep) / f"agent-{count}.log")
        # The audit log has every request the server answered, by identity.
        mine = [
            e
            for e in server.audit()
            if e["user"]["username"] == server.agent_user and e["requestReceivedTimestamp"] >= since
        ]
        creating = [e for e in mine if e["requestReceivedTimestamp"] < deleting]
        verbs = _verbs(creating)
        by_verb = ", ".join(f"{verb} {n / count:.1f}" for verb, n in verbs.most_common())
        delete_verbs = _verbs([e for e in mine if e["requestReceivedTimestamp"] >= deleting])
        return {
            "wall": wall,
            "p50": _percentile(latencies, 0.50),
            "p99": _percentile(latencies, 0.99),
            "requests": sum(verbs.values()) / count,
            "by_verb": by_verb,
            "rss": rss,
            "rss_ready": rss_ready,
            "rss_after_delete": rss_after_delete,
            "agent_cpu": agent_cpu,
            "etcd_cpu": cpu_server[0],
            "apiserver_cpu": cpu_server[1],
            "ready": len(ready),
            "create_runs": text.count("Handler 'vmdisk_changed' succeeded"),
            "delete_wall": delete_wall,
            "delete_cpu": delete_cpu,
            "delete_requests": sum(delete_verbs.values()) / count,
            "index_races": text.count("dictionary changed size during iteration"),
            "pool_full": text.count("Connection pool is full"),
        }


def _verbs(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(
        f"{e['verb']} {e.get('objectRef', {}).get('subresource', '')}".strip()
        + ("" if e.get("responseStatus", {}).get("code", 200) < 300 else " (refused)")
        for e in events
    )


def _rows(count: int, s: dict[str, Any]) -> list[Row]:
    """The figures of one N that are the same at every N."""
    return [
        Row(
            f"(e) {count}: create-handler runs, index races, full connection pools",
            f"{s['create_runs']} runs for {count} disks",
            f"'dictionary changed size' {s['index_races']}, "
            f"'Connection pool is full' {s['pool_full']}",
            f"{s['create_runs'] / count:.2f} runs/disk",
            "1 run per disk, no races",
            s["create_runs"] == count and s["index_races"] == 0,
        ),
        Row(
            f"(e) {count}: delete of all {count} at once, until none is left",
            f"{fmt_s(s['delete_wall'])} ({fmt_s(s['delete_wall'] / count)} per disk)",
            f"agent CPU {s['delete_cpu']:.1f} s ({s['delete_cpu'] / count * 1000:.0f} ms/disk), "
            f"{s['delete_requests']:.1f} requests/disk",
            "",
            "report",
            s["delete_wall"] == s["delete_wall"],  # not NaN: all gone
        ),
    ]


def run(scratch: Path) -> list[Row]:
    images = scratch / "images"
    source = images / "base.raw"
    sha = write_image(source, 64 * MiB, 16 * MiB)
    url = source.as_uri()
    s200 = _scale(scratch, 200, url, sha, images)

    # Baselines: the engine alone (one process, no API) and the bare command.
    engine = Engine.build(Settings(state_dir=scratch / "engine-only", image_dirs=(images,)))
    lookup = MemoryLookup()
    t0 = time.monotonic()
    for i in range(200):
        disk = image_disk(f"e{i:04d}", "qcow2", url, sha, "raw", "64Mi")
        require_ready(engine.reconcile_disk(disk, lookup, None), "engine-only disk")
    engine_wall = time.monotonic() - t0
    cached = engine.cache.lookup(f"sha256-{sha}")
    assert cached is not None
    bare = scratch / "bare"
    bare.mkdir()
    t0 = time.monotonic()
    for i in range(200):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", cached.path, "-F", "raw", bare / f"{i}")
    bare_wall = time.monotonic() - t0

    rows = [
        Row(
            "(e) 200 VMDisks applied at once to the agent (real kube-apiserver), until all Ready",
            f"{fmt_s(s200['wall'])} ({int(s200['ready'])}/200 Ready)",
            f"engine alone, 200 disks: {fmt_s(engine_wall)}; "
            f"bare qemu-img, 200 times: {fmt_s(bare_wall)}",
            f"{s200['wall'] / engine_wall:.2f}x",
            "report",
            s200["ready"] == 200,
        ),
        Row(
            "(e) per-disk latency, create → Ready",
            f"p50 {fmt_s(s200['p50'])}, p99 {fmt_s(s200['p99'])}",
            "",
            "",
            "report",
            True,
        ),
        Row(
            "(e) API requests per disk (the agent's, from the audit log)",
            f"{s200['requests']:.1f}",
            f"by verb: {s200['by_verb']}",
            "",
            "report",
            True,
        ),
        Row(
            "(e) CPU: agent (handlers + engine) vs API server (kube-apiserver + etcd)",
            f"agent {s200['agent_cpu']:.1f} s",
            f"kube-apiserver {s200['apiserver_cpu']:.1f} s, etcd {s200['etcd_cpu']:.1f} s",
            "",
            "report",
            True,
        ),
        Row(
            "(e) agent RSS, 200 disks: peak / when all are Ready / after all are deleted",
            f"{s200['rss'] // MiB} / {s200['rss_ready'] // MiB} / "
            f"{s200['rss_after_delete'] // MiB} MiB",
            "",
            "",
            "report",
            True,
        ),
        *_rows(200, s200),
    ]
    for count in COUNTS:
        if count == 200:
            continue
        s = _scale(scratch, count, url, sha, images)
        rows.append(
            Row(
                f"(e) {count} VMDisks until all Ready (real kube-apiserver)",
                f"{fmt_s(s['wall'])} ({int(s['ready'])}/{count}), "
                f"{s['requests']:.1f} requests/disk, p50 {fmt_s(s['p50'])}, "
                f"p99 {fmt_s(s['p99'])}, agent RSS peak / Ready / deleted {s['rss'] // MiB} / "
                f"{s['rss_ready'] // MiB} / {s['rss_after_delete'] // MiB} MiB",
                f"agent CPU {s['agent_cpu']:.1f} s, kube-apiserver CPU "
                f"{s['apiserver_cpu']:.1f} s, etcd CPU {s['etcd_cpu']:.1f} s",
                "",
                "report",
                s["ready"] == count,
            )
        )
        rows += _rows(count, s)
    return rows
