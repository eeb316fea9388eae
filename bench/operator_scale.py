"""(e) The operator at scale: N VMDisks applied at once to a real `vmdisk run` agent
talking HTTP to the kmock API server (tests/kube.py), qcow2 from one cached base.

Reports time until all Ready, per-disk latency, API requests per disk and the
agent's peak RSS, and splits CPU time between the agent (handlers + engine)
and the API server (which runs in this process), since kmock's own cost is
not the operator's.  Baselines, measured in the same run: the engine alone
making the same disks in one process, and the bare `qemu-img create -b` floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine

from .harness import MemoryLookup, MiB, Row, fmt_s, image_disk, require_ready, sh, write_image

TESTS = Path(__file__).resolve().parent.parent / "tests"


def _agent_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _manifest(name: str, url: str, sha: str) -> dict[str, Any]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": "bench-node",
            "backend": "qcow2",
            "size": "64Mi",
            "source": {"image": {"url": url, "checksum": f"sha256:{sha}", "format": "raw"}},
        },
    }


def _scale(scratch: Path, count: int, url: str, sha: str, images: Path) -> dict[str, float]:
    sys.path.insert(0, str(TESTS))
    from kube import running_api_server  # the test harness's API server

    state = scratch / f"state-{count}"
    warm = Engine.build(Settings(state_dir=state, image_dirs=(images,)))
    require_ready(
        warm.reconcile_disk(
            image_disk("warmup", "qcow2", url, sha, "raw", "64Mi"), MemoryLookup(), None
        ),
        "warm-up disk",
    )  # the base is cached before the clock starts
    with running_api_server() as api:
        kubeconfig = api.write_kubeconfig(scratch / f"kubeconfig-{count}")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "VMDISK_IMAGE_DIRS": str(images)}
        argv = [sys.executable, "-m", "vmdisk.cli", "run", "--node", "bench-node"]
        argv += ["--state-dir", str(state), "--workers", "4"]
        log = open(scratch / f"agent-{count}.log", "wb")  # noqa: SIM115 - the child owns it
        agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            time.sleep(2)  # let the agent log in and start its watches
            api.reset_requests()
            cpu_self0, cpu_agent0 = time.process_time(), _agent_cpu(agent.pid)
            created: dict[str, float] = {}
            ready: dict[str, float] = {}
            start = time.monotonic()
            for i in range(count):
                name = f"d{i:04d}"
                api.create(_manifest(name, url, sha))
                created[name] = time.monotonic()
            while len(ready) < count and time.monotonic() - start < 900:
                for obj in api.list("vmdisks", "default"):
                    name = obj["metadata"]["name"]
                    if name not in ready and (obj.get("status") or {}).get("phase") == "Ready":
                        ready[name] = time.monotonic()
                time.sleep(0.2)
            wall = max(ready.values()) - start if len(ready) == count else float("nan")
            latencies = [ready[n] - created[n] for n in ready]
            operator_requests = sum(api.requests.values())
            return {
                "wall": wall,
                "p50": _percentile(latencies, 0.50),
                "p99": _percentile(latencies, 0.99),
                "requests": operator_requests / count,
                "rss": _peak_rss(agent.pid),
                "agent_cpu": _agent_cpu(agent.pid) - cpu_agent0,
                # This process mostly serves the API (plus the polling above).
                "server_cpu": time.process_time() - cpu_self0,
                "ready": len(ready),
            }
        finally:
            agent.terminate()
            agent.wait(timeout=30)


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

    s1000 = _scale(scratch, 1000, url, sha, images)
    rows = [
        Row(
            "(e) 200 VMDisks applied at once to the agent (kmock API), until all Ready",
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
            "(e) API requests per disk (operator's own)",
            f"{s200['requests']:.1f}",
            "",
            "",
            "report",
            True,
        ),
        Row(
            "(e) CPU: agent (handlers + engine) vs API server (kmock, in the bench process)",
            f"agent {s200['agent_cpu']:.1f} s",
            f"API server + polling {s200['server_cpu']:.1f} s",
            "",
            "report",
            True,
        ),
        Row(
            "(e) agent peak RSS",
            f"200 disks: {s200['rss'] // MiB} MiB; 1000 disks: {s1000['rss'] // MiB} MiB",
            "",
            "",
            "report",
            s1000["ready"] == 1000,
        ),
        Row(
            "(e) 1000 VMDisks until all Ready",
            f"{fmt_s(s1000['wall'])} ({int(s1000['ready'])}/1000), "
            f"{s1000['requests']:.1f} requests/disk",
            f"agent CPU {s1000['agent_cpu']:.1f} s, API server CPU {s1000['server_cpu']:.1f} s",
            "",
            "report",
            s1000["ready"] == 1000,
        ),
    ]
    return rows
