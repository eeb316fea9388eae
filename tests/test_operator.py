"""The real operator process (`vmdisk run`) against the kmock API server over HTTP.

Every status the agent writes passes through the harness, which validates it
against the generated CRD schema and records refusals; each test asserts
there were none.
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

from agents import NS, Agent, assert_clean, phase, ready_reason, vmdisk
from conftest import MiB, sha256_of
from kube import KubeApi

Obj = dict[str, Any]


def test_disk_is_provisioned_with_status_xml_events_and_node_keys(
    api_server: KubeApi, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agent = agents("node-a")
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    api_server.create(vmdisk("root", size="32Mi", source=source))

    obj = api_server.wait_for("vmdisks", NS, "root", phase("Ready"), timeout=30)
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
    reasons = [e["reason"] for e in api_server.list("events", NS)]
    assert "Provisioned" in reasons
    # The liveness endpoint answers for the chart's probe.
    http = urllib3.PoolManager()
    assert http.request("GET", f"http://127.0.0.1:{agent.port}/healthz").status == 200
    http.clear()
    assert_clean(api_server)


def test_other_nodes_objects_are_never_touched(
    api_server: KubeApi, agents: Callable[..., Agent]
) -> None:
    agents("node-a")
    api_server.create(vmdisk("theirs", node="node-b"))
    api_server.create(vmdisk("ours"))
    api_server.wait_for("vmdisks", NS, "ours", phase("Ready"), timeout=30)
    time.sleep(1)
    theirs = api_server.get("vmdisks", NS, "theirs")
    assert theirs is not None
    assert "status" not in theirs
    assert not theirs["metadata"].get("finalizers")
    assert not theirs["metadata"].get("annotations")
    assert_clean(api_server)


def test_two_agents_share_objects_without_conflicts(
    api_server: KubeApi, agents: Callable[..., Agent]
) -> None:
    a, b = agents("node-a"), agents("node-b")
    api_server.create(vmdisk("on-a"))
    api_server.create(vmdisk("on-b", node="node-b"))
    on_a = api_server.wait_for("vmdisks", NS, "on-a", phase("Ready"), timeout=30)
    on_b = api_server.wait_for("vmdisks", NS, "on-b", phase("Ready"), timeout=30)
    assert on_a and on_b
    assert Path(on_a["status"]["path"]).is_relative_to(a.state)
    assert Path(on_b["status"]["path"]).is_relative_to(b.state)
    assert on_a["metadata"]["finalizers"] == ["vmdisk.io/node-a"]
    assert on_b["metadata"]["finalizers"] == ["vmdisk.io/node-b"]
    assert not any("node-b" in k for k in on_a["metadata"].get("annotations", {}))
    assert_clean(api_server)


def test_updates_resize_rerender_and_refuse_shrink(
    api_server: KubeApi, agents: Callable[..., Agent]
) -> None:
    agents("node-a")
    api_server.create(vmdisk("grow"))
    first = api_server.wait_for("vmdisks", NS, "grow", phase("Ready"), timeout=30)
    assert first is not None
    inode = os.stat(first["status"]["path"]).st_ino

    api_server.patch("vmdisks", NS, "grow", {"spec": {"size": "32Mi", "libvirt": {"bus": "sata"}}})
    grown = api_server.wait_for(
        "vmdisks", NS, "grow", lambda o: (o or {})["status"].get("observedGeneration") == 2, 30
    )
    assert grown is not None
    assert grown["status"]["virtualSize"] == 32 * MiB
    assert 'bus="sata"' in grown["status"]["libvirtXML"]
    assert os.stat(grown["status"]["path"]).st_ino == inode  # same disk, grown in place

    # The CRD's transition rule refuses a shrink at the API; a spec that slips
    # past it (an old CRD) is refused by the agent with a condition.
    with pytest.raises(api_server.Error):
        api_server.patch("vmdisks", NS, "grow", {"spec": {"size": "8Mi"}})
    assert_clean(api_server)


def test_snapshot_blocks_deletion_until_removed(
    api_server: KubeApi, agents: Callable[..., Agent]
) -> None:
    agent = agents("node-a")
    api_server.create(vmdisk("src"))
    ready = api_server.wait_for("vmdisks", NS, "src", phase("Ready"), timeout=30)
    assert ready is not None
    disk_path = Path(ready["status"]["path"])
    api_server.create(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "snap", "namespace": NS},
            "spec": {"diskName": "src", "export": {"format": "raw"}},
        }
    )
    snap = api_server.wait_for(
        "disksnapshots",
        NS,
        "snap",
        lambda o: bool((o or {}).get("status", {}).get("readyToUse")),
        30,
    )
    assert snap is not None and Path(snap["status"]["exportPath"]).is_relative_to(agent.state)

    api_server.delete("vmdisks", NS, "src")
    refused = api_server.wait_for("vmdisks", NS, "src", phase("Deleting"), timeout=30)
    assert ready_reason(refused) == "HasDependents"
    assert disk_path.exists()

    api_server.delete("disksnapshots", NS, "snap")
    api_server.wait_for("disksnapshots", NS, "snap", lambda o: o is None, timeout=30)
    api_server.wait_for("vmdisks", NS, "src", lambda o: o is None, timeout=60)
    assert not disk_path.exists()
    assert_clean(api_server)


def test_temporary_failure_retries_until_the_source_appears(
    api_server: KubeApi, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agents("node-a")
    late = image_dir / "late-arrival.qcow2"
    api_server.create(vmdisk("late", size="32Mi", source={"image": {"url": f"file://{late}"}}))
    waiting = api_server.wait_for(
        "vmdisks", NS, "late", phase("Pending", reason="DownloadFailed"), 30
    )
    assert waiting is not None
    message = next(c for c in waiting["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "will retry" in message
    shutil.copy(image_dir / "base.qcow2", late)
    try:
        api_server.wait_for("vmdisks", NS, "late", phase("Ready"), timeout=60)
    finally:
        late.unlink()
    assert_clean(api_server)


def test_restart_resumes_and_reports_vanished_data(
    api_server: KubeApi, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    state = tmp_path / "state-a"
    first = agents("node-a", state)
    api_server.create(vmdisk("keep"))
    api_server.create(vmdisk("lose"))
    api_server.wait_for("vmdisks", NS, "keep", phase("Ready"), timeout=30)
    lost = api_server.wait_for("vmdisks", NS, "lose", phase("Ready"), timeout=30)
    assert lost is not None
    first.stop()
    shutil.rmtree(Path(lost["status"]["path"]).parent)

    agents("node-a", state)
    gone = api_server.wait_for("vmdisks", NS, "lose", phase("Failed"), timeout=30)
    assert ready_reason(gone) == "DiskMissing"
    kept = api_server.get("vmdisks", NS, "keep")
    assert kept is not None and kept["status"]["phase"] == "Ready"
    assert_clean(api_server)


def test_orphans_are_reported_never_deleted(
    api_server: KubeApi, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    state = tmp_path / "state-a"
    agents("node-a", state)
    api_server.create(vmdisk("kept", deletionPolicy="Retain"))
    ready = api_server.wait_for("vmdisks", NS, "kept", phase("Ready"), timeout=30)
    assert ready is not None
    api_server.delete("vmdisks", NS, "kept")
    api_server.wait_for("vmdisks", NS, "kept", lambda o: o is None, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(e["reason"] == "OrphanDisk" for e in api_server.list("events", NS)):
            break
        time.sleep(0.2)
    events = [e for e in api_server.list("events", NS) if e["reason"] == "OrphanDisk"]
    assert events and events[0]["involvedObject"] == {
        "apiVersion": "v1", "kind": "Node", "name": "node-a"
    }  # fmt: skip
    assert Path(ready["status"]["path"]).exists()  # reported, never deleted
    out = subprocess.run(
        [sys.executable, "-m", "vmdisk.cli", "orphans", "--state-dir", str(state)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == [f"{NS}/kept"]


def test_permanent_failure_is_not_retried(
    api_server: KubeApi, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agents("node-a")
    image = image_dir / "base.qcow2"
    wrong = {"image": {"url": f"file://{image}", "checksum": "sha256:" + "0" * 64}}
    api_server.create(vmdisk("bad", size="32Mi", source=wrong))
    failed = api_server.wait_for("vmdisks", NS, "bad", phase("Failed"), timeout=30)
    assert ready_reason(failed) == "ChecksumMismatch"
    writes = len([s for s in api_server.statuses if s.name == "bad"])
    time.sleep(6)  # the first backoff periods of a temporary error
    events = [e for e in api_server.list("events", NS) if e["reason"] == "ChecksumMismatch"]
    assert len(events) == 1
    assert len([s for s in api_server.statuses if s.name == "bad"]) == writes  # no retry loop

    # A new spec is a new attempt.
    fixed = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    with pytest.raises(api_server.Error):  # source is immutable in the CRD
        api_server.patch("vmdisks", NS, "bad", {"spec": {"source": fixed}})
    assert_clean(api_server)


def test_progress_is_published_while_provisioning(
    api_server: KubeApi, agents: Callable[..., Agent], image_dir: Path
) -> None:
    agents("node-a")
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    api_server.create(vmdisk("slow", backend="raw", size="32Mi", source=source))
    api_server.wait_for("vmdisks", NS, "slow", phase("Ready"), timeout=30)
    phases = [s.status.get("phase") for s in api_server.statuses if s.name == "slow"]
    assert phases[0] == "Provisioning" and phases[-1] == "Ready"
    progress = [s.status.get("progress") for s in api_server.statuses if s.name == "slow"]
    assert "0%" in progress and progress[-1] == "100%"
    assert_clean(api_server)
