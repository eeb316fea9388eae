"""Metrics, JSON logs and RBAC of a running agent (`vmdisk run`) against the kmock API server.

The agent runs as its own process like in test_operator.py, with
``--metrics-port`` and ``--log-format json``; the test scrapes /metrics like
Prometheus does, and compares every request the agent made with the rules
`vmdisk.operator.rbac` derives (and the chart's ClusterRole is checked against
those in test_chart.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import urllib3
from prometheus_client.parser import text_string_to_metric_families

from agents import NS, Agent, assert_clean, free_port, phase, vmdisk
from conftest import sha256_of
from kube import KubeApi
from vmdisk.api.common import Condition
from vmdisk.api.vmdisk import VMDiskStatus
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.operator import rbac
from vmdisk.operator.metrics import Metrics, result_of

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def test_results_and_engine_gauges(tmp_path: Path) -> None:
    ready = Condition(type="Ready", status="True", reason="Provisioned", message="")
    retry = Condition(type="Ready", status="False", reason="DependencyNotReady", message="")
    assert result_of(VMDiskStatus(phase="Ready", conditions=[ready])) == "ready"
    assert result_of(VMDiskStatus(phase="Pending", conditions=[retry])) == "retry"
    assert result_of(VMDiskStatus(phase="Ready", conditions=[retry])) == "retry"
    assert result_of(VMDiskStatus(phase="Failed", conditions=[retry])) == "failed"

    metrics = Metrics("node-a")
    engine = Engine.build(Settings(state_dir=tmp_path, node_name="node-a"), observer=metrics)
    assert engine.observer is metrics and engine.cache.observer is metrics
    metrics.watch_engine(engine)
    metrics.disk_seen("ns", "a", "Ready")
    metrics.disk_seen("ns", "b", "Failed")
    metrics.disk_seen("ns", "b", None)
    metrics.disk_seen("ns", "gone", "Failed", "DiskMissing")
    (tmp_path / "orphans.json").write_text('{"time": "t", "node": "node-a", "orphans": ["a/x"]}')
    from prometheus_client import generate_latest

    found = samples(generate_latest(metrics.registry).decode())
    assert value(found, "vmdisk_disks", phase="Ready") == 1
    assert value(found, "vmdisk_disks", phase="Failed") == 1
    assert value(found, "vmdisk_missing_disks") == 1
    assert value(found, "vmdisk_orphan_disks") == 1
    assert (value(found, "vmdisk_state_dir_free_bytes") or 0) > 0
    assert value(found, "vmdisk_image_cache_bytes") == 0
    assert value(found, "vmdisk_agent_info", node="node-a", version=_version()) == 1


def _version() -> str:
    import vmdisk

    return vmdisk.__version__


def scrape(port: int, timeout: float = 15.0) -> Samples:
    """The agent's /metrics, parsed; waits for the server to come up."""
    http = urllib3.PoolManager(retries=False)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return samples(
                    http.request("GET", f"http://127.0.0.1:{port}/metrics").data.decode()
                )
            except urllib3.exceptions.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        http.clear()


def test_running_agent_serves_metrics_logs_json_and_stays_within_its_rbac(
    api_server: KubeApi, agents: Callable[..., Agent], image_dir: Path
) -> None:
    port = free_port()
    agent = agents("node-a", args=[f"--metrics-port={port}", "--log-format=json"])
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    api_server.create(vmdisk("root", size="32Mi", source=source))
    api_server.create(vmdisk("data", backend="raw"))
    api_server.create(vmdisk("bad", source={"disk": {"name": "missing"}}))
    for name in ("root", "data"):
        api_server.wait_for("vmdisks", NS, name, phase("Ready"), timeout=30)
    api_server.wait_for("vmdisks", NS, "bad", phase("Pending"), timeout=30)
    snap = {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "DiskSnapshot",
        "metadata": {"name": "snap", "namespace": NS},
        "spec": {"diskName": "root"},
    }
    api_server.create(snap)
    api_server.wait_for(
        "disksnapshots", NS, "snap", lambda o: bool(((o or {}).get("status") or {}).get("phase"))
    )

    found = scrape(port)
    assert value(found, "vmdisk_reconcile_total", backend="qcow2", result="ready") == 1
    assert value(found, "vmdisk_reconcile_total", backend="raw", result="ready") == 1
    assert (value(found, "vmdisk_reconcile_total", backend="qcow2", result="retry") or 0) >= 1
    count = value(found, "vmdisk_reconcile_duration_seconds_count", backend="raw", result="ready")
    assert count == 1
    assert value(found, "vmdisk_image_cache_lookups_total", result="miss") == 1
    assert value(found, "vmdisk_image_fetch_bytes_total", scheme="file") == image.stat().st_size
    assert value(found, "vmdisk_image_fetch_duration_seconds_count", scheme="file") == 1
    assert (value(found, "vmdisk_image_cache_bytes") or 0) > 0
    assert value(found, "vmdisk_image_cache_entries") == 1
    assert value(found, "vmdisk_disks", phase="Ready") == 2
    assert value(found, "vmdisk_disks", phase="Pending") == 1

    api_server.delete("disksnapshots", NS, "snap")
    api_server.wait_for("disksnapshots", NS, "snap", lambda o: o is None, timeout=30)
    api_server.delete("vmdisks", NS, "data")
    api_server.wait_for("vmdisks", NS, "data", lambda o: o is None, timeout=30)
    deadline = time.monotonic() + 10
    while value(scrape(port), "vmdisk_disks", phase="Ready") != 1:
        assert time.monotonic() < deadline, "vmdisk_disks did not follow the deletion"
        time.sleep(0.1)

    # Every request the agent made is covered by the derived rules, and every
    # derived rule was used: the ClusterRole is neither short nor generous.
    made = {tuple(key.split(" ", 1)) for key in api_server.request_details}
    allowed = {(p.verb, p.resource) for p in rbac.permissions()}
    # Secrets are read only for encrypted (LVM) disks, which need device-mapper,
    # absent here; the derivation covers that call through ApiSecrets.
    assert made == allowed - {("get", "secrets")}
    assert_clean(api_server)

    # JSON logs: every line is one object; handler lines name their object.
    lines = agent.log.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e.get("object", {}).get("name") == "root" for e in entries)


def test_metrics_bind_the_address_they_are_given() -> None:
    metrics = Metrics("node-a")
    port = metrics.serve(0, "127.0.0.1")
    try:
        assert metrics._server is not None
        assert metrics._server.server_address[0] == "127.0.0.1"  # not every interface
        reply = urllib3.request("GET", f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert reply.status == 200 and b"vmdisk_reconcile_total" in reply.data
    finally:
        metrics.stop()
