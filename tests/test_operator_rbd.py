"""Shared storage in cluster mode: a VM moves, its RBD disk moves with it untouched.

Two real agents (node-a, node-b) against the kmock API server and the test
suite's real single-node Ceph.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable

from agents import NS, Agent, assert_clean, phase, vmdisk
from ceph import CephTestCluster
from kube import KubeApi

POOL = "moving"


def image_digest(cluster: CephTestCluster, image: str) -> str:
    out = subprocess.run(
        ["rbd", "--conf", str(cluster.conf), "export", f"{POOL}/{image}", "-"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return hashlib.sha256(out.stdout).hexdigest()


def test_rbd_disk_follows_its_vm_to_another_node(
    api_server: KubeApi, agents: Callable[..., Agent], ceph_cluster: CephTestCluster
) -> None:
    ceph_cluster.create_pool(POOL)
    env = {"VMDISK_RBD_POOL": POOL, "VMDISK_CEPH_CONF": str(ceph_cluster.conf)}
    agents("node-a", env=env)
    agents("node-b", env=env)
    # The administrator's class; the agents' settings allow its pool and ceph.conf.
    api_server.create(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDiskClass",
            "metadata": {"name": "rbd"},
            "spec": {"backend": "rbd", "parameters": {"pool": POOL}},
        }
    )
    api_server.create(
        vmdisk("roaming", backend="rbd", size="16Mi", source={"blank": {"filesystem": "ext4"}})
    )
    first = api_server.wait_for("vmdisks", NS, "roaming", phase("Ready"), timeout=60)
    assert first is not None
    status = first["status"]
    assert status["shared"] is True and status["path"].startswith(f"rbd:{POOL}/")
    assert first["metadata"]["finalizers"] == ["vmdisk.io/node-a"]
    image = status["path"].split("/", 1)[1]
    before = image_digest(ceph_cluster, image)

    api_server.patch("vmdisks", NS, "roaming", {"spec": {"nodeName": "node-b"}})
    moved = api_server.wait_for(
        "vmdisks",
        NS,
        "roaming",
        lambda o: (
            (o or {}).get("status", {}).get("nodeName") == "node-b"
            and o is not None
            and o["metadata"].get("finalizers") == ["vmdisk.io/node-b"]
        ),
        timeout=60,
    )
    assert moved is not None and moved["status"]["phase"] == "Ready"
    assert image_digest(ceph_cluster, image) == before  # the data was not touched
    meta = json.loads(ceph_cluster.rbd("image-meta", "list", f"{POOL}/{image}", "--format", "json"))
    assert meta["vmdisk.node"] == "node-b"  # node-a's orphan scan no longer lists it

    api_server.delete("vmdisks", NS, "roaming")
    api_server.wait_for("vmdisks", NS, "roaming", lambda o: o is None, timeout=60)
    assert image not in ceph_cluster.rbd("ls", POOL).split()
    assert_clean(api_server)
