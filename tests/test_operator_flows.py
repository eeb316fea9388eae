"""User flows against the real agent: kubectl apply, restore, SIGKILL mid-download,
and a malformed object that slipped past admission.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from agents import NS, Agent, assert_clean, phase, ready_reason, vmdisk
from conftest import MiB
from httpserver import ImageServer
from kube import KubeApi

KUBECTL = Path(sys.executable).parent / "kubectl"


def random_image(size: int = 24 * MiB) -> tuple[bytes, str]:
    data = random.Random(5).randbytes(size // 2) + bytes(size // 2)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def kubectl(kubeconfig: Path, *args: str) -> str:
    result = subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_kubectl_apply_qcow2_and_raw_from_http(
    api_server: KubeApi, kubeconfig: Path, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    agents("node-a")
    data, checksum = random_image()
    with ImageServer() as server:
        url = server.add("/disk.raw", data)
        source = {"image": {"url": url, "checksum": checksum, "format": "raw"}}
        manifest = tmp_path / "disks.yaml"
        manifest.write_text(
            yaml.safe_dump_all(
                [
                    vmdisk("web", backend="qcow2", size="64Mi", source=source),
                    vmdisk("db", backend="raw", size="64Mi", source=source),
                ]
            )
        )
        out = kubectl(kubeconfig, "apply", "--validate=false", "-f", str(manifest))
        assert "vmdisk.vmdisk.io/web created" in out
        for name in ("web", "db"):
            ready = api_server.wait_for("vmdisks", NS, name, phase("Ready"), timeout=60)
            assert ready is not None and ready["status"]["libvirtXML"].startswith("<disk")
        assert [s.status for s in server.gets("/disk.raw")] == [200]  # one download
    table = kubectl(kubeconfig, "get", "vmdisks")
    lines = table.split("\n")
    assert lines[0].split()[:6] == ["NAME", "CLASS", "BACKEND", "SIZE", "NODE", "PHASE"]
    # The built-in class of the disk's backend, pinned in status.
    assert {line.split()[1] for line in lines[1:] if line} <= {"qcow2", "raw"}
    assert_clean(api_server)


def test_restore_from_a_disksnapshot(api_server: KubeApi, agents: Callable[..., Agent]) -> None:
    agents("node-a")
    api_server.create(vmdisk("vm", size="16Mi"))
    ready = api_server.wait_for("vmdisks", NS, "vm", phase("Ready"), timeout=30)
    assert ready is not None
    path = ready["status"]["path"]

    def write(byte: str) -> None:
        argv = ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{byte} 0 4k", path]
        subprocess.run(argv, check=True, capture_output=True)

    def first_bytes() -> bytes:
        out = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "read -v 0 4", path], check=True, capture_output=True
        )
        return out.stdout.split(b":", 1)[1][:12]

    write("11")
    api_server.create(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "golden", "namespace": NS},
            "spec": {"diskName": "vm"},
        }
    )
    api_server.wait_for(
        "disksnapshots", NS, "golden", lambda o: bool((o or {}).get("status", {}).get("readyToUse"))
    )
    write("22")
    assert b"22 22" in first_bytes()
    api_server.patch("vmdisks", NS, "vm", {"spec": {"restore": {"snapshot": "golden"}}})
    restored = api_server.wait_for(
        "vmdisks",
        NS,
        "vm",
        lambda o: (o or {}).get("status", {}).get("restoredSnapshot") == "golden",
        timeout=30,
    )
    assert restored is not None and restored["status"]["phase"] == "Ready"
    assert b"11 11" in first_bytes()
    assert_clean(api_server)


def test_sigkill_mid_download_then_ready_without_a_second_download(
    api_server: KubeApi, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    state = tmp_path / "state-a"
    first = agents("node-a", state)
    data, checksum = random_image()
    with ImageServer() as server:
        server.switches.stall_once_after = 8 * MiB  # the download hangs here for a while
        server.switches.stall_seconds = 4.0
        url = server.add("/slow.raw", data)
        source = {"image": {"url": url, "checksum": checksum, "format": "raw"}}
        api_server.create(vmdisk("slow", size="32Mi", source=source))
        deadline = time.monotonic() + 30
        while not server.gets("/slow.raw"):
            assert time.monotonic() < deadline, "the agent never started the download"
            time.sleep(0.05)
        time.sleep(0.5)  # well into the body
        first.proc.kill()  # SIGKILL
        first.proc.wait()
        agents("node-a", state)
        ready = api_server.wait_for("vmdisks", NS, "slow", phase("Ready"), timeout=60)
        assert ready is not None
        statuses = [s.status for s in server.gets("/slow.raw")]
    assert statuses[0] == 200 and statuses.count(200) == 1  # resumed, not downloaded twice
    assert all(s == 206 for s in statuses[1:])
    leftovers = [p for p in state.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]
    assert leftovers == [] and list((state / "cache" / "tmp").iterdir()) == []
    assert_clean(api_server)


def test_malformed_object_fails_and_the_agent_keeps_serving(
    api_server: KubeApi, agents: Callable[..., Agent]
) -> None:
    agents("node-a")
    broken = vmdisk("broken", source={"blank": {}, "disk": {"name": "x"}}, size="lots")
    api_server.inject(broken)  # bypasses the schema, as an old CRD would have
    failed = api_server.wait_for("vmdisks", NS, "broken", phase("Failed"), timeout=30)
    assert ready_reason(failed) == "InvalidSpec"
    message = next(c for c in failed["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "spec.size" in message and "spec.source" in message
    api_server.create(vmdisk("fine"))
    api_server.wait_for("vmdisks", NS, "fine", phase("Ready"), timeout=30)


def test_malformed_status_and_snapshot_never_wedge_the_agent(
    api_server: KubeApi, agents: Callable[..., Agent]
) -> None:
    """A status written past admission is rebuilt; a list-valued diskName is no one's."""
    agents("node-a")
    disk = vmdisk("garbled", backend="raw")
    disk["status"] = {"phase": 7, "conditions": "not-a-list", "virtualSize": {"x": 1}}
    api_server.inject(disk)
    api_server.inject(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "listy", "namespace": NS},
            "spec": {"diskName": ["garbled", "other"]},
        }
    )

    def rebuilt(obj: dict[str, object] | None) -> bool:
        status = (obj or {}).get("status")
        return isinstance(status, dict) and status.get("phase") == "Ready"

    ready = api_server.wait_for("vmdisks", NS, "garbled", rebuilt, timeout=30)
    assert ready is not None
    assert ready["status"]["virtualSize"] == 16 * MiB
    assert [c["type"] for c in ready["status"]["conditions"]] == ["Ready"]
    api_server.create(vmdisk("after"))
    api_server.wait_for("vmdisks", NS, "after", phase("Ready"), timeout=30)


def test_a_refused_shrink_keeps_the_disk_ready_and_warns(
    api_server: KubeApi, agents: Callable[..., Agent]
) -> None:
    agents("node-a")
    api_server.create(vmdisk("steady", backend="raw"))
    ready = api_server.wait_for("vmdisks", NS, "steady", phase("Ready"), timeout=30)
    assert ready is not None
    shrunk = {**ready, "spec": {**ready["spec"], "size": "8Mi"}}
    shrunk["metadata"] = {**ready["metadata"], "generation": ready["metadata"]["generation"] + 1}
    api_server.inject(shrunk)  # the CRD's CEL rule would refuse it; an old CRD did not

    def refused(obj: dict[str, object] | None) -> bool:
        status = (obj or {}).get("status") or {}
        assert isinstance(status, dict)
        return any(c["type"] == "ChangeRefused" for c in status.get("conditions", []))

    after = api_server.wait_for("vmdisks", NS, "steady", refused, timeout=30)
    assert after is not None and after["status"]["phase"] == "Ready"
    assert ready_reason(after) == "Provisioned"
    deadline = time.monotonic() + 10
    while not [e for e in api_server.list("events", NS) if e["reason"] == "ShrinkNotSupported"]:
        assert time.monotonic() < deadline, "no Warning event for the refused change"
        time.sleep(0.2)
