"""The kmock-based API server (tests/kube.py) behaves as kopf and kubectl need."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from kube import KubeApi

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qcow2-from-image.yaml"
KUBECTL = Path(sys.executable).parent / "kubectl"
NS, NAME = "default", "web-root"


def manifest() -> dict[str, Any]:
    """The local-mode example as a cluster needs it: with its node."""
    obj: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    obj["spec"]["nodeName"] = "node-a"
    return obj


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(KUBECTL), "--kubeconfig", str(kubeconfig), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def test_kubectl_apply_get_and_refusal(
    api_server: KubeApi, kubeconfig: Path, tmp_path: Path
) -> None:
    example = tmp_path / "web-root.yaml"
    example.write_text(yaml.safe_dump(manifest()))
    out = kubectl(kubeconfig, "apply", "--validate=false", "-f", str(example)).stdout
    assert "vmdisk.vmdisk.io/web-root created" in out
    table = kubectl(kubeconfig, "get", "vmdisks").stdout.splitlines()
    assert table[0].split() == ["NAME", "CLASS", "BACKEND", "SIZE", "NODE", "PHASE", "AGE"]
    assert table[1].split()[:3] == ["web-root", "qcow2", "1Gi"]  # no class resolved yet: blank
    assert "web-root" in kubectl(kubeconfig, "get", "vmd", "-o", "name").stdout
    out = kubectl(kubeconfig, "apply", "--validate=false", "-f", str(example)).stdout
    assert "unchanged" in out
    stored = api_server.get("vmdisks", NS, NAME)
    assert stored is not None and stored["metadata"]["generation"] == 1
    assert stored["spec"]["libvirt"]["cache"] == "none"  # CRD defaults applied on create

    bad = manifest()
    bad["metadata"]["name"] = "two-sources"
    bad["spec"]["source"]["blank"] = {"filesystem": "ext4"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = kubectl(
        kubeconfig, "apply", "--validate=false", "-f", str(tmp_path / "bad.yaml"), check=False
    )
    assert result.returncode != 0
    assert "spec.source" in result.stderr and "exactly one of" in result.stderr


def test_generation_and_resource_version(api_server: KubeApi) -> None:
    created = api_server.create(manifest())
    meta = created["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"].endswith("Z")
    rv = int(meta["resourceVersion"])

    labelled = api_server.patch("vmdisks", NS, NAME, {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > rv

    grown = api_server.patch("vmdisks", NS, NAME, {"spec": {"size": "2Gi"}})
    assert grown["metadata"]["generation"] == 2
    assert int(grown["metadata"]["resourceVersion"]) > int(labelled["metadata"]["resourceVersion"])
    assert grown["metadata"]["uid"] == meta["uid"]

    same = api_server.patch("vmdisks", NS, NAME, {"spec": {"size": "2Gi"}})
    assert same["metadata"]["resourceVersion"] == grown["metadata"]["resourceVersion"]

    status = api_server.patch(
        "vmdisks", NS, NAME, {"status": {"phase": "Ready"}}, subresource="status"
    )
    assert status["metadata"]["generation"] == 2

    stale = copy.deepcopy(grown)
    stale["spec"]["size"] = "3Gi"
    with pytest.raises(api_server.Error) as conflict:
        api_server.replace(stale)
    assert conflict.value.code == 409 and conflict.value.reason == "Conflict"

    current = api_server.get("vmdisks", NS, NAME)
    assert current is not None
    test_op = {"op": "test", "path": "/metadata/resourceVersion", "value": rv}
    add_op = {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}
    # kopf's optimistic JSON patch, against a stale version
    with pytest.raises(api_server.Error) as failed:
        api_server.patch("vmdisks", NS, NAME, [test_op, add_op], patch_type="json")
    assert failed.value.code == 422
    test_op["value"] = current["metadata"]["resourceVersion"]
    patched = api_server.patch("vmdisks", NS, NAME, [test_op, add_op], patch_type="json")
    assert patched["metadata"]["finalizers"] == ["x/y"] and patched["metadata"]["generation"] == 2


def test_status_subresource(api_server: KubeApi) -> None:
    obj = manifest()
    obj["status"] = {"phase": "Ready"}
    assert "status" not in api_server.create(obj)  # ignored on create

    main = api_server.patch(
        "vmdisks", NS, NAME, {"spec": {"size": "2Gi"}, "status": {"phase": "Failed"}}
    )
    assert "status" not in main and main["spec"]["size"] == "2Gi"

    sub = api_server.patch(
        "vmdisks",
        NS,
        NAME,
        {"spec": {"size": "5Gi"}, "status": {"phase": "Provisioning"}},
        subresource="status",
    )
    assert sub["status"] == {"phase": "Provisioning"} and sub["spec"]["size"] == "2Gi"

    sub["status"] = {"phase": "Ready", "observedGeneration": 2}
    sub["metadata"]["labels"] = {"ignored": "yes"}
    replaced = api_server.replace(sub, subresource="status")
    assert replaced["status"]["phase"] == "Ready" and "labels" not in replaced["metadata"]
    assert [w.status.get("phase") for w in api_server.statuses] == ["Provisioning", "Ready"]

    with pytest.raises(api_server.Error) as invalid:
        api_server.patch("vmdisks", NS, NAME, {"status": {"phase": "Bogus"}}, subresource="status")
    assert invalid.value.code == 422 and "status.phase" in invalid.value.message


def test_finalizers_hold_deletion(api_server: KubeApi) -> None:
    obj = manifest()
    obj["metadata"]["finalizers"] = ["vmdisk.io/cleanup"]
    api_server.create(obj)
    deleting = api_server.delete("vmdisks", NS, NAME)
    assert deleting is not None and deleting["metadata"]["deletionTimestamp"]
    again = api_server.delete("vmdisks", NS, NAME)
    assert again is not None
    assert again["metadata"]["deletionTimestamp"] == deleting["metadata"]["deletionTimestamp"]
    held = api_server.get("vmdisks", NS, NAME)
    assert held is not None and held["metadata"]["deletionTimestamp"]

    api_server.patch("vmdisks", NS, NAME, {"metadata": {"finalizers": None}})
    assert api_server.get("vmdisks", NS, NAME) is None
    assert api_server.delete("vmdisks", NS, NAME) is None

    plain = manifest()
    plain["metadata"]["name"] = "plain"
    api_server.create(plain)
    assert api_server.delete("vmdisks", NS, "plain") is not None
    assert api_server.get("vmdisks", NS, "plain") is None


def test_schema_refusals_name_the_field(api_server: KubeApi) -> None:
    bad = manifest()
    bad["spec"]["source"]["blank"] = {}
    with pytest.raises(api_server.Error) as two_sources:
        api_server.create(bad)
    assert two_sources.value.code == 422 and two_sources.value.reason == "Invalid"
    causes = two_sources.value.status["details"]["causes"]
    assert [c["field"] for c in causes] == ["spec.source"]

    api_server.create(manifest())
    for patch, field in (
        ({"spec": {"backend": "raw"}}, "spec.backend"),
        ({"spec": {"size": "1Mi"}}, "spec.size"),
    ):
        with pytest.raises(api_server.Error) as refused:  # transition rules see the old object
            api_server.patch("vmdisks", NS, NAME, patch)
        assert refused.value.code == 422 and field in refused.value.message

    unknown = api_server.patch("vmdisks", NS, NAME, {"spec": {"bogus": 1}})
    assert "bogus" not in unknown["spec"]  # pruned, as the apiserver does
    assert api_server.server.pruned == ["vmdisks/web-root: spec.bogus"]


def test_watch_sees_added_modified_deleted(api_server: KubeApi) -> None:
    start = api_server.request("GET", api_server.path("vmdisks", NS))["metadata"]["resourceVersion"]
    live: list[dict[str, Any]] = []
    watcher = threading.Thread(
        target=lambda: live.extend(
            api_server.watch("vmdisks", NS, timeout=10, stop=lambda events: len(events) >= 3)
        )
    )
    watcher.start()
    deadline = time.monotonic() + 5
    while not api_server.server._watches and time.monotonic() < deadline:
        time.sleep(0.01)
    api_server.create(manifest())
    api_server.patch("vmdisks", NS, NAME, {"spec": {"size": "2Gi"}})
    api_server.delete("vmdisks", NS, NAME)
    watcher.join(15)

    assert [e["type"] for e in live] == ["ADDED", "MODIFIED", "DELETED"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in live]
    assert versions == sorted(set(versions)) and versions[0] > int(start)

    resumed = api_server.watch(
        "vmdisks", NS, timeout=2, resourceVersion=start, stop=lambda e: len(e) >= 3
    )
    assert resumed == live  # resuming from a resourceVersion replays what was missed

    bookmarked = api_server.watch(
        "vmdisks",
        None,
        timeout=2,
        sendInitialEvents="true",
        allowWatchBookmarks="true",
        stop=lambda events: events[-1]["type"] == "BOOKMARK",
    )
    assert bookmarked[-1]["object"]["metadata"]["annotations"] == {
        "k8s.io/initial-events-end": "true"
    }


def test_selectors_and_pages(api_server: KubeApi) -> None:
    for name, node in (("a", "node-a"), ("b", "node-b"), ("c", "node-a")):
        obj = manifest()
        obj["metadata"].update(name=name, labels={"vmdisk.io/node": node})
        obj["spec"]["nodeName"] = node
        api_server.create(obj)

    def names(items: list[dict[str, Any]]) -> list[str]:
        return [o["metadata"]["name"] for o in items]

    assert names(api_server.list("vmdisks", label_selector="vmdisk.io/node=node-a")) == ["a", "c"]
    notin = api_server.list("vmdisks", label_selector="vmdisk.io/node notin (node-a)")
    assert names(notin) == ["b"]
    assert names(api_server.list("vmdisks", NS, field_selector="metadata.name!=a")) == ["b", "c"]
    # refused as by a real apiserver: the CRD declares no selectableFields
    with pytest.raises(api_server.Error) as unsupported:
        api_server.list("vmdisks", field_selector="spec.nodeName=node-a")
    assert unsupported.value.code == 400

    page = api_server.request("GET", api_server.path("vmdisks"), fields={"limit": "2"})
    assert names(page["items"]) == ["a", "b"] and page["metadata"]["continue"]
    rest = api_server.request(
        "GET",
        api_server.path("vmdisks"),
        fields={"limit": "2", "continue": page["metadata"]["continue"]},
    )
    assert names(rest["items"]) == ["c"] and "continue" not in rest["metadata"]

    events = api_server.watch("vmdisks", timeout=1, labelSelector="vmdisk.io/node=node-b")
    assert names([e["object"] for e in events]) == ["b"]


OPERATOR = """
import kopf

@kopf.on.create("vmdisk.io", "v1alpha1", "vmdisks")
def created(body, patch, **_):
    kopf.info(body, reason="Provisioned", message="ready")  # an event: v1/events
    patch.status["phase"] = "Ready"

@kopf.on.delete("vmdisk.io", "v1alpha1", "vmdisks")
def deleted(**_):
    pass
"""


@pytest.mark.slow
def test_real_kopf_operator(api_server: KubeApi, kubeconfig: Path, tmp_path: Path) -> None:
    script = tmp_path / "operator.py"
    script.write_text(OPERATOR)
    log_path = tmp_path / "kopf.log"
    argv = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "--verbose"]
    argv.append(str(script))
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        api_server.create(manifest())
        ready = api_server.wait_for(
            "vmdisks", NS, NAME, lambda o: (o or {}).get("status", {}).get("phase") == "Ready", 20
        )
        assert ready is not None and ready["metadata"]["finalizers"]  # kopf's, for on.delete
        api_server.delete("vmdisks", NS, NAME)
        api_server.wait_for("vmdisks", NS, NAME, lambda o: o is None, 20)
        deadline = time.monotonic() + 10
        while not api_server.list("events", NS) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(20)
    log = log_path.read_text()

    assert [w.status for w in api_server.statuses] == [{"phase": "Ready"}]
    assert api_server.request_details["patch vmdisks/status"] == 1
    assert api_server.requests["watch"] >= 2  # the CRDs and the vmdisks
    assert api_server.rejections == [] and api_server.server.pruned == []
    posted = api_server.list("events", NS)
    assert [(e["reason"], e["involvedObject"]["name"]) for e in posted] == [("Provisioned", NAME)]
    assert "Handler 'created' succeeded" in log and "Handler 'deleted' succeeded" in log
    for bad in ("Traceback", "[ERROR", "[WARNING", "NotFound", "not found", "Unprocessable"):
        assert bad not in log, log  # discovery found namespaces, CRDs and events; no refusals
