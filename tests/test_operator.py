"""The real operator process (`vmdisk run`) against a real kube-apiserver.

The agent logs in as the chart's ServiceAccount.  Every write it makes goes
through the real admission chain (RBAC, the CRD schema and its CEL rules);
each test asserts, from the API server's audit log, that none was refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import urllib3

from agents import Agent, assert_clean, phase, ready_reason, vmdisk
from apiserver import Kube
from conftest import MiB, sha256_of
from vmdisk.operator.handlers import backoff

Obj = dict[str, Any]


def test_disk_is_provisioned_with_status_xml_events_and_node_keys(
    kube: Kube, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agent = agents("node-a")
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    kube.create(vmdisk("root", size="32Mi", source=source))

    obj = kube.wait_for("vmdisks", "root", phase("Ready"), timeout=30)
    assert obj is not None
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert status["virtualSize"] == 32 * MiB and status["nodeName"] == "node-a"
    assert status["baseImage"].startswith("sha256-")
    assert status["libvirtXML"].startswith('<disk type="file"')
    assert Path(status["path"]).is_relative_to(agent.state)
    assert obj["metadata"]["finalizers"] == ["vmdisk.io/node-a"]
    assert all(
        key.startswith("node-a.node.vmdisk.io/") or not key.endswith("last-handled-configuration")
        for key in obj["metadata"].get("annotations", {})
    )
    # kopf posts events from a queue of its own, so the Event may follow the status.
    deadline = time.monotonic() + 10
    while "Provisioned" not in (reasons := [e["reason"] for e in kube.list("events")]):
        assert time.monotonic() < deadline, reasons
        time.sleep(0.1)
    # The liveness endpoint answers for the chart's probe.
    http = urllib3.PoolManager()
    assert http.request("GET", f"http://127.0.0.1:{agent.port}/healthz").status == 200
    http.clear()
    assert_clean(kube)


def test_other_nodes_objects_are_never_touched(kube: Kube, agents: Callable[..., Agent]) -> None:
    agents("node-a")
    kube.create(vmdisk("theirs", node="node-b"))
    kube.create(vmdisk("ours"))
    kube.wait_for("vmdisks", "ours", phase("Ready"), timeout=30)
    time.sleep(1)
    theirs = kube.get("vmdisks", "theirs")
    assert theirs is not None
    assert "status" not in theirs
    assert not theirs["metadata"].get("finalizers")
    assert not theirs["metadata"].get("annotations")
    assert_clean(kube)


def test_two_agents_share_objects_without_conflicts(
    kube: Kube, agents: Callable[..., Agent]
) -> None:
    a, b = agents("node-a"), agents("node-b")
    kube.create(vmdisk("on-a"))
    kube.create(vmdisk("on-b", node="node-b"))
    on_a = kube.wait_for("vmdisks", "on-a", phase("Ready"), timeout=30)
    on_b = kube.wait_for("vmdisks", "on-b", phase("Ready"), timeout=30)
    assert on_a and on_b
    assert Path(on_a["status"]["path"]).is_relative_to(a.state)
    assert Path(on_b["status"]["path"]).is_relative_to(b.state)
    assert on_a["metadata"]["finalizers"] == ["vmdisk.io/node-a"]
    assert on_b["metadata"]["finalizers"] == ["vmdisk.io/node-b"]
    assert not any("node-b" in k for k in on_a["metadata"].get("annotations", {}))
    assert_clean(kube)


def test_updates_resize_rerender_and_refuse_shrink(
    kube: Kube, agents: Callable[..., Agent]
) -> None:
    agents("node-a")
    kube.create(vmdisk("grow"))
    first = kube.wait_for("vmdisks", "grow", phase("Ready"), timeout=30)
    assert first is not None
    inode = os.stat(first["status"]["path"]).st_ino

    kube.patch("vmdisks", "grow", {"spec": {"size": "32Mi", "libvirt": {"bus": "sata"}}})
    grown = kube.wait_for(
        "vmdisks", "grow", lambda o: (o or {})["status"].get("observedGeneration") == 2, 30
    )
    assert grown is not None
    assert grown["status"]["virtualSize"] == 32 * MiB
    assert 'bus="sata"' in grown["status"]["libvirtXML"]
    assert os.stat(grown["status"]["path"]).st_ino == inode  # same disk, grown in place

    # The CRD's transition rule refuses a shrink at the API; a spec that slips
    # past it (an old CRD) is refused by the agent with a condition.
    with pytest.raises(kube.Error):
        kube.patch("vmdisks", "grow", {"spec": {"size": "8Mi"}})
    assert_clean(kube)


def test_snapshot_blocks_deletion_until_removed(kube: Kube, agents: Callable[..., Agent]) -> None:
    agent = agents("node-a")
    kube.create(vmdisk("src"))
    ready = kube.wait_for("vmdisks", "src", phase("Ready"), timeout=30)
    assert ready is not None
    disk_path = Path(ready["status"]["path"])
    kube.create(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "snap"},
            "spec": {"diskName": "src", "export": {"format": "raw"}},
        }
    )
    snap = kube.wait_for(
        "disksnapshots",
        "snap",
        lambda o: bool((o or {}).get("status", {}).get("readyToUse")),
        30,
    )
    assert snap is not None and Path(snap["status"]["exportPath"]).is_relative_to(agent.state)

    kube.delete("vmdisks", "src")
    refused = kube.wait_for("vmdisks", "src", phase("Deleting"), timeout=30)
    assert ready_reason(refused) == "HasDependents"
    assert disk_path.exists()

    kube.delete("disksnapshots", "snap")
    kube.wait_for("disksnapshots", "snap", lambda o: o is None, timeout=30)
    kube.wait_for("vmdisks", "src", lambda o: o is None, timeout=60)
    assert not disk_path.exists()
    assert_clean(kube)


def test_temporary_failure_retries_until_the_source_appears(
    kube: Kube, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agents("node-a")
    late = image_dir / "late-arrival.qcow2"
    kube.create(vmdisk("late", size="32Mi", source={"image": {"url": f"file://{late}"}}))
    waiting = kube.wait_for("vmdisks", "late", phase("Pending", reason="DownloadFailed"), 30)
    assert waiting is not None
    message = next(c for c in waiting["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "will retry" in message
    shutil.copy(image_dir / "base.qcow2", late)
    try:
        kube.wait_for("vmdisks", "late", phase("Ready"), timeout=60)
    finally:
        late.unlink()
    assert_clean(kube)


def test_restart_resumes_and_reports_vanished_data(
    kube: Kube, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    state = tmp_path / "state-a"
    first = agents("node-a", state)
    kube.create(vmdisk("keep"))
    kube.create(vmdisk("lose"))
    kube.wait_for("vmdisks", "keep", phase("Ready"), timeout=30)
    lost = kube.wait_for("vmdisks", "lose", phase("Ready"), timeout=30)
    assert lost is not None
    first.stop()
    shutil.rmtree(Path(lost["status"]["path"]).parent)

    agents("node-a", state)
    gone = kube.wait_for("vmdisks", "lose", phase("Failed"), timeout=30)
    assert ready_reason(gone) == "DiskMissing"
    kept = kube.get("vmdisks", "keep")
    assert kept is not None and kept["status"]["phase"] == "Ready"
    assert_clean(kube)


def test_orphans_are_reported_never_deleted(
    kube: Kube, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    state = tmp_path / "state-a"
    agents("node-a", state)
    kube.create(vmdisk("kept", deletionPolicy="Retain"))
    ready = kube.wait_for("vmdisks", "kept", phase("Ready"), timeout=30)
    assert ready is not None
    kube.delete("vmdisks", "kept")
    kube.wait_for("vmdisks", "kept", lambda o: o is None, timeout=30)

    def orphan_events() -> list[Obj]:
        # Node events live in "default", as the kubelet's do.
        return [
            e
            for e in kube.list("events", namespace="default")
            if e["reason"] == "OrphanDisk" and f"{kube.namespace}/kept" in e["message"]
        ]

    deadline = time.monotonic() + 20
    while not orphan_events() and time.monotonic() < deadline:
        time.sleep(0.2)
    events = orphan_events()
    assert events and events[0]["involvedObject"] == {
        "apiVersion": "v1", "kind": "Node", "name": "node-a"
    }  # fmt: skip
    assert Path(ready["status"]["path"]).exists()  # reported, never deleted
    out = subprocess.run(
        [sys.executable, "-m", "vmdisk.cli", "orphans", "--state-dir", str(state)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == [f"{kube.namespace}/kept"]


def test_permanent_failure_is_not_retried(
    kube: Kube, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agents("node-a")
    image = image_dir / "base.qcow2"
    wrong = {"image": {"url": f"file://{image}", "checksum": "sha256:" + "0" * 64}}
    kube.create(vmdisk("bad", size="32Mi", source=wrong))
    failed = kube.wait_for("vmdisks", "bad", phase("Failed"), timeout=30)
    assert ready_reason(failed) == "ChecksumMismatch"
    writes = len(kube.history("vmdisks", "bad"))
    time.sleep(6)  # the first backoff periods of a temporary error
    events = [e for e in kube.list("events") if e["reason"] == "ChecksumMismatch"]
    assert len(events) == 1
    assert len(kube.history("vmdisks", "bad")) == writes  # no retry loop: nothing written

    # A new spec is a new attempt.
    fixed = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    with pytest.raises(kube.Error):  # source is immutable in the CRD
        kube.patch("vmdisks", "bad", {"spec": {"source": fixed}})
    assert_clean(kube)


def test_progress_is_published_while_provisioning(
    kube: Kube, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agents("node-a")
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    kube.create(vmdisk("slow", backend="raw", size="32Mi", source=source))
    kube.wait_for("vmdisks", "slow", phase("Ready"), timeout=30)
    statuses = [o["status"] for o in kube.history("vmdisks", "slow") if o.get("status")]
    phases = [s.get("phase") for s in statuses]
    assert phases[0] == "Provisioning" and phases[-1] == "Ready"
    progress = [s.get("progress") for s in statuses]
    assert "0%" in progress and progress[-1] == "100%"
    assert_clean(kube)


def test_backoff_doubles_to_five_minutes_but_a_disk_in_use_is_looked_at_every_30_s() -> None:
    assert [backoff(r) for r in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert [backoff(r, "DiskInUse") for r in range(5)] == [5, 10, 20, 30, 30]
