"""(h) The fleet: N agents (N = 1, 10, 50), each for a different node, watching
1,000 VMDisks that all belong to one of them, against the suite's real etcd +
kube-apiserver (newest version).  Agents are `vmdisk run` processes on this
machine, logged in as the chart's ServiceAccount.

Two ways, each from a fresh server: the usual CRDs (every agent is sent every
VMDisk and filters by node itself) and ``vmdisk crds --selectable-fields``
(spec.nodeName selectable: each agent watches with a field selector).  Measured
from the moment all agents watch until the owner has made all 1,000 disks
(blank qcow2): kube-apiserver + etcd CPU (/proc), the bytes of VMDisk watch
events the server sent (its own ``apiserver_watch_events_sizes`` metric) per
agent, and an idle agent's CPU.  (An agent's /proc/PID/io rchar does not count
its socket reads, so the bytes are the server's count.)

``VMDISK_BENCH_FLEET="1 10 50"`` picks the fleet sizes; ``VMDISK_BENCH_FLEET_DISKS``
the disk count [1000].
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import urllib3
from prometheus_client.parser import text_string_to_metric_families

from .harness import Row, fmt_s, process_cpu, real_api_server

FLEETS = tuple(int(n) for n in os.environ.get("VMDISK_BENCH_FLEET", "1 10 50").split())
DISKS = int(os.environ.get("VMDISK_BENCH_FLEET_DISKS", "1000"))
OWNER = "node-0"
READY = re.compile(r" (\S+)/(\S+): ready \(")
STARTED = ("watching the VMDisks of node", "cannot select VMDisks by spec.nodeName")


def _manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": name},
        "spec": {"nodeName": OWNER, "backend": "qcow2", "size": "16Mi", "source": {"blank": {}}},
    }


def _watch_bytes(server: Any) -> float:
    """Bytes of VMDisk watch events the server has sent so far, to all watchers."""
    http = urllib3.PoolManager(ca_certs=str(server.ca_file))
    resp = http.request(
        "GET", f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.admin_token}"}
    )
    total = 0.0
    for family in text_string_to_metric_families(resp.data.decode()):
        for sample in family.samples:
            if (
                sample.name == "apiserver_watch_events_sizes_sum"
                and sample.labels.get("resource") == "vmdisks"
            ):
                total += sample.value
    return total


@contextmanager
def _agents(scratch: Path, server: Any, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "KUBECONFIG": str(server.agent_kubeconfig)}
    procs, logs = [], []
    try:
        for i in range(count):
            log = scratch / f"agent-node-{i}.log"
            argv = [sys.executable, "-m", "vmdisk.cli", "run", "--node", f"node-{i}"]
            argv += ["--state-dir", str(scratch / f"state-{i}")]
            with open(log, "wb") as out:  # the child keeps its own descriptor
                procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
            logs.append(log)
        deadline = time.monotonic() + 600
        while not all(any(s in p.read_text(errors="replace") for s in STARTED) for p in logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the {count} agents did not all start")
            time.sleep(1)
        time.sleep(5)  # the watches open right after the login
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready_names(log: Path) -> set[str]:
    return {m.group(2) for m in READY.finditer(log.read_text(errors="replace"))}


def _fleet(scratch: Path, count: int, selected: bool) -> dict[str, float]:
    with real_api_server(scratch / "kube") as kube:
        server = kube.server
        if selected:
            server.apply(server.selectable_crds())
            while not server._selects_node():
                time.sleep(0.5)
        with _agents(scratch, server, count) as procs:
            pids = [p.pid for p in server.procs]
            cpu0 = [process_cpu(pid) for pid in pids]
            agents0 = [process_cpu(p.pid) for p in procs]
            bytes0 = _watch_bytes(server)
            start = time.monotonic()
            for i in range(DISKS):
                kube.create(_manifest(f"d{i:04d}"))
            owner_log = scratch / "agent-node-0.log"
            while len(_ready_names(owner_log)) < DISKS and time.monotonic() - start < 900:
                time.sleep(1)
            wall = time.monotonic() - start
            time.sleep(3)  # the last status patches reach the watchers
            server_cpu = sum(process_cpu(pid) - c for pid, c in zip(pids, cpu0, strict=True))
            sent = _watch_bytes(server) - bytes0
            idle = [process_cpu(p.pid) - c for p, c in zip(procs, agents0, strict=True)][1:]
            ready = len(_ready_names(owner_log))
    return {
        "wall": wall,
        "ready": ready,
        "server_cpu": server_cpu,
        "bytes_per_agent": sent / count,
        "idle_cpu": statistics.median(idle) if idle else float("nan"),
    }


def _mib(value: float) -> str:
    return "n/a" if value != value else f"{value / 2**20:.1f} MiB"


def run(scratch: Path) -> list[Row]:
    rows = []
    for count in FLEETS:
        found = {}
        for selected in (False, True):
            where = scratch / f"fleet-{count}-{'selected' if selected else 'all'}"
            where.mkdir()
            found[selected] = _fleet(where, count, selected)
        every, own = found[False], found[True]
        rows.append(
            Row(
                f"(h) {count} agents, {DISKS} VMDisks of one node: kube-apiserver + etcd CPU, "
                "field selector on spec.nodeName vs every agent watching all",
                f"{own['server_cpu']:.1f} s; watch bytes per agent {_mib(own['bytes_per_agent'])}"
                f"; all Ready in {fmt_s(own['wall'])} ({int(own['ready'])}/{DISKS})",
                f"{every['server_cpu']:.1f} s; watch bytes per agent "
                f"{_mib(every['bytes_per_agent'])}; all Ready in {fmt_s(every['wall'])} "
                f"({int(every['ready'])}/{DISKS})",
                f"{own['server_cpu'] / every['server_cpu']:.2f}x",
                "report",
                own["ready"] == DISKS and every["ready"] == DISKS,
            )
        )
        if count > 1:
            rows.append(
                Row(
                    f"(h) {count} agents: CPU of one idle agent (median)",
                    f"{own['idle_cpu']:.2f} s",
                    f"{every['idle_cpu']:.2f} s",
                    "",
                    "report",
                    True,
                )
            )
    return rows
