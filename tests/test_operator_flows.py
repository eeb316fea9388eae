"""User flows against the real agent: kubectl apply, restore, SIGKILL mid-download,
and a malformed object that slipped past admission.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from agents import Agent, assert_clean, phase, ready_reason, vmdisk
from apiserver import Kube
from conftest import MiB
from httpserver import ImageServer


def random_image(size: int = 24 * MiB) -> tuple[bytes, str]:
    data = random.Random(5).randbytes(size // 2) + bytes(size // 2)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def test_kubectl_apply_qcow2_and_raw_from_http(
    kube: Kube, agents: Callable[..., Agent], tmp_path: Path
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
        # Server-side field validation (kubectl's default --validate=strict).
        out = kube.server.kubectl("apply", "-n", kube.namespace, "-f", str(manifest))
        assert "vmdisk.vmdisk.io/web created" in out
        for name in ("web", "db"):
            ready = kube.wait_for("vmdisks", name, phase("Ready"), timeout=60)
            assert ready is not None and ready["status"]["libvirtXML"].startswith("<disk")
        assert [s.status for s in server.gets("/disk.raw")] == [200]  # one download
    table = kube.server.kubectl("get", "-n", kube.namespace, "vmdisks")
    lines = table.split("\n")
    assert lines[0].split()[:6] == ["NAME", "CLASS", "BACKEND", "SIZE", "NODE", "PHASE"]
    # The built-in class of the disk's backend, pinned in status.
    assert {line.split()[1] for line in lines[1:] if line} <= {"qcow2", "raw"}
    assert_clean(kube)


def test_restore_from_a_disksnapshot(kube: Kube, agents: Callable[..., Agent]) -> None:
    agents("node-a")
    kube.create(vmdisk("vm", size="16Mi"))
    ready = kube.wait_for("vmdisks", "vm", phase("Ready"), timeout=30)
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
    kube.create(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "golden"},
            "spec": {"diskName": "vm"},
        }
    )
    kube.wait_for(
        "disksnapshots", "golden", lambda o: bool((o or {}).get("status", {}).get("readyToUse"))
    )
    write("22")
    assert b"22 22" in first_bytes()
    kube.patch("vmdisks", "vm", {"spec": {"restore": {"snapshot": "golden"}}})
    restored = kube.wait_for(
        "vmdisks",
        "vm",
        lambda o: (o or {}).get("status", {}).get("restoredSnapshot") == "golden",
        timeout=30,
    )
    assert restored is not None and restored["status"]["phase"] == "Ready"
    assert b"11 11" in first_bytes()
    assert_clean(kube)


def test_sigkill_mid_download_then_ready_without_a_second_download(
    kube: Kube, agents: Callable[..., Agent], tmp_path: Path
) -> None:
    state = tmp_path / "state-a"
    first = agents("node-a", state)
    data, checksum = random_image()
    with ImageServer() as server:
        server.switches.stall_once_after = 8 * MiB  # the download hangs here for a while
        server.switches.stall_seconds = 4.0
        url = server.add("/slow.raw", data)
        source = {"image": {"url": url, "checksum": checksum, "format": "raw"}}
        kube.create(vmdisk("slow", size="32Mi", source=source))
        deadline = time.monotonic() + 30
        while not server.gets("/slow.raw"):
            assert time.monotonic() < deadline, "the agent never started the download"
            time.sleep(0.05)
        time.sleep(0.5)  # well into the body
        first.proc.kill()  # SIGKILL
        first.proc.wait()
        agents("node-a", state)
        ready = kube.wait_for("vmdisks", "slow", phase("Ready"), timeout=60)
        assert ready is not None
        statuses = [s.status for s in server.gets("/slow.raw")]
    assert statuses[0] == 200 and statuses.count(200) == 1  # resumed, not downloaded twice
    assert all(s == 206 for s in statuses[1:])
    leftovers = [p for p in state.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]
    assert leftovers == [] and list((state / "cache" / "tmp").iterdir()) == []
    assert_clean(kube)


def test_malformed_object_fails_and_the_agent_keeps_serving(
    kube: Kube, agents: Callable[..., Agent]
) -> None:
    agents("node-a")
    broken = vmdisk("broken", source={"blank": {}, "disk": {"name": "x"}}, size="lots")
    with pytest.raises(kube.Error, match=r"spec\.size"):  # the real admission refuses it
        kube.create(broken)
    with kube.server.permissive_crds():  # as a cluster with an older, laxer CRD would have
        kube.create(broken)
        failed = kube.wait_for("vmdisks", "broken", phase("Failed"), timeout=30)
        assert ready_reason(failed) == "InvalidSpec"
        message = next(c for c in failed["status"]["conditions"] if c["type"] == "Ready")["message"]
        assert "spec.size" in message and "spec.source" in message
        # Deleted while the lax CRD still serves it: under the strict one a
        # 1.29 server refuses every write to the stored object, even removing
        # a finalizer (CRD validation ratcheting is on by default only from 1.30).
        kube.delete("vmdisks", "broken")
        kube.wait_for("vmdisks", "broken", lambda o: o is None, timeout=30)
    kube.create(vmdisk("fine"))
    kube.wait_for("vmdisks", "fine", phase("Ready"), timeout=30)
    assert_clean(kube)


def test_malformed_status_and_snapshot_never_wedge_the_agent(
    kube: Kube, agents: Callable[..., Agent]
) -> None:
    """A status written past admission is rebuilt; a list-valued diskName is no one's."""
    agents("node-a")
    with kube.server.permissive_crds():  # what a buggy client could write under a lax CRD
        kube.create(vmdisk("garbled", backend="raw"))
        garbage = {"phase": 7, "conditions": "not-a-list", "virtualSize": {"x": 1}}
        kube.patch("vmdisks", "garbled", {"status": garbage}, subresource="status")
        listy = {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "listy"},
            "spec": {"diskName": ["garbled", "other"]},
        }
        kube.create(listy)

        def rebuilt(obj: dict[str, object] | None) -> bool:
            status = (obj or {}).get("status")
            return isinstance(status, dict) and status.get("phase") == "Ready"

        ready = kube.wait_for("vmdisks", "garbled", rebuilt, timeout=30)
        assert ready is not None
        assert ready["status"]["virtualSize"] == 16 * MiB
        assert [c["type"] for c in ready["status"]["conditions"]] == ["Ready"]
        kube.delete("disksnapshots", "listy")  # invalid under the real CRD: gone before it returns
        kube.wait_for("disksnapshots", "listy", lambda o: o is None, timeout=30)
    kube.create(vmdisk("after"))
    kube.wait_for("vmdisks", "after", phase("Ready"), timeout=30)
    assert_clean(kube)


def test_a_refused_shrink_keeps_the_disk_ready_and_warns(
    kube: Kube, agents: Callable[..., Agent]
) -> None:
    agents("node-a")
    kube.create(vmdisk("steady", backend="raw"))
    ready = kube.wait_for("vmdisks", "steady", phase("Ready"), timeout=30)
    assert ready is not None
    with pytest.raises(kube.Error, match="size can only grow"):  # the CRD's CEL rule
        kube.patch("vmdisks", "steady", {"spec": {"size": "8Mi"}})
    with kube.server.permissive_crds():  # an old CRD without the rule took it
        kube.patch("vmdisks", "steady", {"spec": {"size": "8Mi"}})

        def refused(obj: dict[str, object] | None) -> bool:
            status = (obj or {}).get("status") or {}
            assert isinstance(status, dict)
            return any(c["type"] == "ChangeRefused" for c in status.get("conditions", []))

        after = kube.wait_for("vmdisks", "steady", refused, timeout=30)
    assert after is not None and after["status"]["phase"] == "Ready"
    assert ready_reason(after) == "Provisioned"
    deadline = time.monotonic() + 10
    while not [e for e in kube.list("events") if e["reason"] == "ShrinkNotSupported"]:
        assert time.monotonic() < deadline, "no Warning event for the refused change"
        time.sleep(0.2)
    assert_clean(kube)
