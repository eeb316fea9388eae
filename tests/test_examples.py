"""examples/: every manifest valid for the models (the server: test_crd_server), every backend and
source kind shown, the file-backed stories applied in local mode, and the VM
controller example producing a domain libvirt accepts.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmdisk.local.manifests import load

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MORE = EXAMPLES / "more"
CLUSTER = EXAMPLES / "cluster"
VMDISK = [sys.executable, "-m", "vmdisk.cli"]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def local_mode(path: Path) -> bool:
    """examples/ itself and the local stories in more/ (no node named); cluster/ is not."""
    return path.parent != CLUSTER and not any(
        doc["kind"] == "VMDisk" and "nodeName" in doc["spec"]
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    )


def test_every_manifest_is_valid_for_the_models() -> None:
    # The real API server's verdict: test_crd_server.test_every_example_is_accepted.
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        assert load(path), path


def test_cluster_examples_name_their_node_and_an_image_a_pod_can_reach() -> None:
    cluster = [(p, d) for p, d in manifests() if not local_mode(p) and d["kind"] == "VMDisk"]
    assert {p.parent for p, _ in cluster} >= {CLUSTER}
    assert {next(iter(d["spec"]["source"])) for p, d in cluster if p.parent == CLUSTER} == {
        "image",
        "blank",
    }
    for path, doc in cluster:
        assert doc["spec"]["nodeName"], path
        url = doc["spec"]["source"].get("image", {}).get("url", "")
        host = urllib.parse.urlsplit(url).hostname or ""
        # Inside an agent pod, loopback is the pod itself.
        assert host not in ("localhost", "::1") and not host.startswith("127."), (path, url)
    # make demo's (local) examples keep their loopback demo server and name no node.
    top = [d for p, d in manifests() if p.parent == EXAMPLES and d["kind"] == "VMDisk"]
    assert top and all("nodeName" not in d["spec"] for d in top)


def test_every_backend_and_source_kind_is_shown() -> None:
    docs = [doc for _, doc in manifests()]
    disks = [d for d in docs if d["kind"] == "VMDisk"]
    classes = {
        d["metadata"]["name"]: d["spec"]["backend"] for d in docs if d["kind"] == "VMDiskClass"
    }
    backends = {d["spec"].get("backend") or classes.get(d["spec"].get("className")) for d in disks}
    assert backends >= {"raw", "qcow2", "ploop", "lvm", "rbd"}
    assert {next(iter(d["spec"]["source"])) for d in disks} == {
        "image",
        "blank",
        "disk",
        "snapshot",
    }
    assert any(d["kind"] == "DiskSnapshot" for d in docs)
    assert any("restore" in d["spec"] for d in disks)
    assert any(
        d["spec"]["source"].get("image", {}).get("url", "").startswith("rbd://") for d in disks
    )


def test_every_rbd_url_is_one_the_backend_accepts() -> None:
    from vmdisk.backends.rbd import StoreUrl

    urls = [
        d["spec"]["source"]["image"]["url"]
        for _, d in manifests()
        if d["kind"] == "VMDisk" and "image" in d["spec"]["source"]
    ]
    rbd_urls = [u for u in urls if u.startswith("rbd://")]
    assert rbd_urls
    for url in rbd_urls:
        assert str(StoreUrl.parse(url)) == url  # raises InvalidSpec on another form


def test_the_demo_applies_only_the_top_level_folder() -> None:
    # scripts/demo.sh runs `vmdisk apply -f examples/`: the node-specific ones stay out.
    top = [doc for path, doc in manifests() if path.parent == EXAMPLES]
    assert len(load(EXAMPLES)) == len(top)


def _apply(path: Path, state: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*VMDISK, "apply", "-f", str(path), "--state-dir", str(state), "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return list(data["items"]) if "items" in data else [data]


def test_clone_snapshot_and_restore_in_local_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    disks = _apply(MORE / "clone-from-disk.yaml", state)
    assert [d["status"]["phase"] for d in disks] == ["Ready", "Ready"]
    assert [d["status"]["backend"] for d in disks] == ["qcow2", "raw"]
    (snap,) = _apply(MORE / "snapshot.yaml", state)
    assert snap["status"]["readyToUse"] is True
    (restored,) = _apply(MORE / "restore.yaml", state)
    assert restored["status"]["restoredSnapshot"] == "app-data-before-upgrade"

    # The VM controller example pastes both disks' XML into a domain libvirt accepts.
    listing = subprocess.run(
        [*VMDISK, "get", "vmdisks", "--state-dir", str(state), "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    controller = runpy.run_path(str(MORE / "vm-controller.py"))
    domain = controller["attach"](DOMAIN, controller["disks_of"](json.loads(listing.stdout)))
    assert domain.count("<disk ") == 2
    import libvirt

    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(domain, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        targets = {t.get("dev") for t in _disk_targets(dom.XMLDesc())}
        assert targets == {"vdb", "vdc"}
    finally:
        conn.close()


def test_vm_controller_refuses_disks_that_are_not_ready() -> None:
    controller = runpy.run_path(str(MORE / "vm-controller.py"))
    pending = {"metadata": {"name": "x"}, "status": {"phase": "Provisioning"}}
    with pytest.raises(controller["NotReady"], match="x is not Ready"):
        controller["attach"](DOMAIN, [pending])


def _disk_targets(xml: str) -> list[Any]:
    import xml.etree.ElementTree as ET

    return list(ET.fromstring(xml).iter("target"))


DOMAIN = """<domain type='test'>
  <name>vm-example</name>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices/>
</domain>"""
