"""(f) End-to-end latency of one disk: `kubectl apply` → Ready, on a real agent.

One qcow2 disk from a cached base at a time, 20 times, against the suite's
real etcd + kube-apiserver (tests/apiserver.py); kubectl runs as the admin, the
agent as the chart's ServiceAccount.  The time is split into the kubectl command itself,
the engine (from the agent's own `vmdisk_reconcile_duration_seconds`) and the
rest: kopf's event handling, status writes and the API server.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import urllib3
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine

from .harness import (
    TESTS,
    MemoryLookup,
    MiB,
    Row,
    fmt_s,
    image_disk,
    real_api_server,
    require_ready,
    write_image,
)

DISKS = 20


def _engine_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the agent's qcow2 reconciles that ended Ready."""
    text = urllib3.request("GET", f"http://127.0.0.1:{port}/metrics").data.decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("backend") == "qcow2" and sample.labels.get("result") == "ready":
                found[sample.name] = sample.value
    return (
        found.get("vmdisk_reconcile_duration_seconds_sum", 0.0),
        found.get("vmdisk_reconcile_duration_seconds_count", 0.0),
    )


def _phase(obj: dict[str, Any] | None) -> str | None:
    status = (obj or {}).get("status") or {}
    return status.get("phase")


def run(scratch: Path) -> list[Row]:
    sys.path.insert(0, str(TESTS))
    from agents import free_port

    images = scratch / "images"
    source = images / "base.raw"
    sha = write_image(source, 64 * MiB, 16 * MiB)
    url = source.as_uri()
    state = scratch / "state"
    warm = Engine.build(Settings(state_dir=state, image_dirs=(images,)))
    warmup = image_disk("warmup", "qcow2", url, sha, "raw", "64Mi")
    require_ready(warm.reconcile_disk(warmup, MemoryLookup(), None), "warm-up disk")
    with real_api_server(scratch / "kube") as kube:
        server = kube.server
        port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(server.agent_kubeconfig),  # the chart's ServiceAccount
            "VMDISK_IMAGE_DIRS": str(images),
        }
        argv = [sys.executable, "-m", "vmdisk.cli", "run", "--node", "bench-node"]
        argv += ["--state-dir", str(state), f"--metrics-port={port}"]
        with open(scratch / "agent.log", "wb") as log:
            agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(3)
            totals, cli = [], []
            for i in range(DISKS):
                manifest = scratch / f"d{i}.yaml"
                body = image_disk(f"d{i:02d}", "qcow2", url, sha, "raw", "64Mi")
                doc = body.model_dump(mode="json", by_alias=True, exclude_none=True)
                doc["spec"]["nodeName"] = "bench-node"
                doc["metadata"]["namespace"] = kube.namespace
                manifest.write_text(yaml.safe_dump(doc))
                start = time.monotonic()
                server.kubectl("apply", "-f", str(manifest))
                cli.append(time.monotonic() - start)
                while _phase(kube.get("vmdisks", f"d{i:02d}")) != "Ready":
                    if time.monotonic() - start > 60:
                        log_tail = (scratch / "agent.log").read_text()[-2000:]
                        raise RuntimeError(f"d{i:02d} not Ready after 60 s; agent log:\n{log_tail}")
                    time.sleep(0.005)
                totals.append(time.monotonic() - start)
            engine_sum, count = _engine_seconds(port)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    total, kubectl_time = statistics.median(totals), statistics.median(cli)
    engine = engine_sum / count if count else float("nan")
    rest = total - kubectl_time - engine
    return [
        Row(
            f"(f) kubectl apply → Ready, one qcow2 disk from a cached base (median of {DISKS})",
            fmt_s(total),
            f"kubectl itself {fmt_s(kubectl_time)}; engine {fmt_s(engine)} (mean of "
            f"{int(count)}); operator + API overhead {fmt_s(rest)}",
            "",
            "report",
            count >= DISKS,
        )
    ]
