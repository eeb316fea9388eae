"""``helm install`` of the chart against the real API server (Helm's own Go SDK).

Every object the chart renders must be accepted and stored.  No kubelet,
scheduler or controller-manager runs here, so the DaemonSet exists but never
gets a pod: what is checked is what the API server decides (admission, schema
validation, RBAC objects, CRDs), not that the agent starts — the container
image is run as an agent by test_image.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from apiserver import CHART, KubeApiServer, KubectlError

Obj = dict[str, Any]
FULL_VALUES = CHART / "ci" / "full-values.yaml"


def full_values() -> Obj:
    values: Obj = yaml.safe_load(FULL_VALUES.read_text())
    # The ServiceMonitor kind is the Prometheus Operator's CRD, which this
    # cluster does not have (a real API server refuses an unknown kind).
    values["metrics"]["serviceMonitor"]["enabled"] = False
    return values


@pytest.mark.parametrize("full", [False, True], ids=["defaults", "full"])
def test_helm_install_is_accepted(kube_api: KubeApiServer, tmp_path: Path, full: bool) -> None:
    release, namespace = ("full", "vmdisk-full") if full else ("plain", "vmdisk-plain")
    values = full_values() if full else None
    with helm.Config(kubeconfig_path=kube_api.admin_kubeconfig, namespace=namespace) as config:
        installed = config.install(
            CHART, release, values, namespace=namespace, create_namespace=True, timeout=120
        )
        try:
            assert installed["status"] == "deployed"
            objects = [doc for doc in yaml.safe_load_all(installed["manifest"]) if doc]
            kinds = sorted(o["kind"] for o in objects)
            base = ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
            assert set(base) <= set(kinds)
            for obj in objects:  # each one stored as rendered
                meta = obj["metadata"]
                where = ["-n", meta.get("namespace", namespace)]
                stored = yaml.safe_load(
                    kube_api.kubectl("get", obj["kind"], meta["name"], *where, "-o", "yaml")
                )
                assert stored["metadata"]["labels"]["app.kubernetes.io/instance"] == release
            ds = next(o for o in objects if o["kind"] == "DaemonSet")
            stored = yaml.safe_load(
                kube_api.kubectl(
                    "get", "daemonset", ds["metadata"]["name"], "-n", namespace, "-o", "yaml"
                )
            )
            pod = stored["spec"]["template"]["spec"]
            assert pod["containers"][0]["securityContext"]["privileged"] is True
            # No controller-manager: nothing schedules or counts pods.
            assert kube_api.kubectl("get", "pods", "-n", namespace, "-o", "name") == ""
            assert kube_api.kubectl("get", "crd", "vmdisks.vmdisk.io", "-o", "name")
        finally:
            config.uninstall(release)
    assert "DaemonSet" not in kube_api.kubectl("get", "daemonsets", "-n", namespace)


def test_crds_upgrade_the_way_the_readme_says(kube_api: KubeApiServer) -> None:
    """README "Upgrading CRDs": a plain server-side apply of a newer CRD conflicts with the
    field manager Helm installed it under, and ``--force-conflicts`` takes the fields over."""
    path = CHART / "crds" / "vmdisks.vmdisk.io.yaml"
    installed = yaml.safe_load(path.read_text())
    newer = copy.deepcopy(installed)
    schema = newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["description"] += " (a newer release)"

    def apply(crd: Obj, *flags: str) -> str:
        return kube_api.kubectl(
            "apply", "--server-side", *flags, "-f", "-", stdin=yaml.safe_dump(crd)
        )

    def stored_description() -> str:
        crd = yaml.safe_load(kube_api.kubectl("get", "crd", "vmdisks.vmdisk.io", "-o", "yaml"))
        return str(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"])

    # As Helm installs CRDs: a plain update under its own field manager.
    helm_made = copy.deepcopy(installed)
    helm_made["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] += " (helm)"
    kube_api.kubectl("replace", "--field-manager=helm", "-f", "-", stdin=yaml.safe_dump(helm_made))
    with pytest.raises(KubectlError, match='conflict with "helm"'):
        apply(newer)
    try:
        apply(newer, "--force-conflicts")
        assert stored_description().endswith("(a newer release)")
    finally:
        apply(installed, "--force-conflicts")
    assert stored_description() == installed["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]["description"]  # fmt: skip
