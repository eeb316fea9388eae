"""The Helm chart: rendered with Helm's own Go SDK (helm-python-sdk), linted, and
every rendered object validated against the Kubernetes schemas
(kubernetes-validate, strict); its RBAC compared with what the agent calls.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import vmdisk
from vmdisk.api.crd import MIN_KUBERNETES
from vmdisk.config import Settings
from vmdisk.operator import rbac

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "vmdisk-operator"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
KUBE_VERSION = f"{MIN_KUBERNETES}.0"  # the oldest Kubernetes the chart supports
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: Obj | None = None) -> list[Obj]:
    """Every object the chart renders (NOTES.txt aside), as a release in vmdisk-system."""
    manifests = chart.render(values, name="vmdisk", namespace="vmdisk-system", is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def full_values() -> Obj:
    values: Obj = yaml.safe_load(FULL_VALUES.read_text())
    return values


def one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def test_app_version_is_the_package_version() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["appVersion"] == project["version"] == vmdisk.__version__


def test_one_minimum_kubernetes_version_everywhere() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["kubeVersion"] == f">={MIN_KUBERNETES}.0-0"
    readme = (ROOT / "README.md").read_text()
    assert set(re.findall(r"Kubernetes (1\.\d+) or newer", readme)) == {MIN_KUBERNETES}
    from vmdisk.cli import _cmd_crds

    assert f"Kubernetes {MIN_KUBERNETES} or newer" in (_cmd_crds.__doc__ or "")
    crds_help = subprocess.run(
        [sys.executable, "-m", "vmdisk.cli", "crds", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Kubernetes {MIN_KUBERNETES} or newer" in crds_help


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["defaults", "full"])
def test_chart_lints_strictly(values: Path | None) -> None:
    given = yaml.safe_load(values.read_text()) if values else None
    report = helm.lint(CHART, given, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # Only the "icon is recommended" kind of advice (severity 1) is left.
    assert [m for m in report["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("full", [False, True], ids=["defaults", "full"])
def test_every_rendered_object_is_valid_kubernetes(chart: helm.Chart, full: bool) -> None:
    objects = render(chart, full_values() if full else None)
    kinds = sorted(o["kind"] for o in objects)
    base = ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Role", "RoleBinding"]
    base += ["ServiceAccount"]
    assert kinds == sorted(base + (["Service", "ServiceMonitor"] if full else []))
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: no upstream schema
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_chart_crds_are_the_generated_ones() -> None:
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    for name in chart_crds:
        text = (CHART / "crds" / name).read_text()
        assert text == (ROOT / "crds" / name).read_text(), f"{name}: run `make crds`"
        kubernetes_validate.validate(yaml.safe_load(text), KUBE_VERSION, strict=True)


def test_cluster_role_is_exactly_what_the_agent_calls(chart: helm.Chart) -> None:
    objects = render(chart)
    role = one(objects, "ClusterRole")
    assert role["rules"] == rbac.cluster_rules()
    # Never anything cluster-wide but reading and patching our own resources and
    # reading CRDs; no Secrets at all (they are the namespaced Role's).
    flat = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
    assert not any(r == "secrets" for _, r, _ in flat)
    assert {v for _, _, v in flat} <= {"list", "watch", "patch", "create"}
    assert {v for _, r, v in flat if r == "vmdiskclasses"} == {"list", "watch"}


def test_secrets_are_read_only_in_the_agents_own_namespace(chart: helm.Chart) -> None:
    objects = render(chart)
    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "vmdisk-system"
    assert role["rules"] == rbac.namespaced_rules()
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]
    }  # fmt: skip
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": "vmdisk-system"}
    ]
    narrowed = one(render(chart, {"rbac": {"secretNames": ["disk-keys"]}}), "Role")
    assert narrowed["rules"][0]["resourceNames"] == ["disk-keys"]
    # The agent is told its namespace: the only one it reads keys from.
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["VMDISK_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_rbac_switches_off(chart: helm.Chart) -> None:
    values = {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "agent"}}
    objects = render(chart, values)
    assert {o["kind"] for o in objects} == {"ConfigMap", "DaemonSet"}
    spec = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "agent"


def test_configmap_is_read_by_the_settings(chart: helm.Chart) -> None:
    config = one(render(chart, full_values()), "ConfigMap")["data"]
    assert all(key.startswith("VMDISK_") for key in config)
    settings = Settings.from_env(config)
    assert settings.default_backend == "lvm" and settings.lvm_vgs == ("vg0",)
    assert settings.rbd_pools == ("vms",) and settings.rbd_users == ("vmdisk",)
    assert settings.rbd_secret_uuid == "5ab1e5f4-6f0c-4e42-9d1c-3f1e7a3b9c11"
    assert [str(c) for c in settings.ceph_confs] == ["/etc/ceph/ceph.conf"]
    assert settings.cache_max_age == 7 * 86400
    assert [str(p) for p in settings.image_dirs] == ["/srv/images", "/var/lib/images"]
    assert settings.image_hosts == ("images.example.com", "10.20.0.0/16")
    assert settings.cluster_cidrs == ("10.96.0.0/12", "10.244.0.0/16")
    defaults = one(render(chart), "ConfigMap")["data"]
    assert set(defaults) == {
        "VMDISK_STATE_DIR",
        "VMDISK_DEFAULT_BACKEND",
        "VMDISK_CACHE_MAX_AGE",
        "VMDISK_LIBVIRT_URI",
    }
    assert Settings.from_env(defaults).libvirt_uri == "qemu:///system"
    # The agent reaches the node's libvirtd through its socket directory.
    pod = one(render(chart), "DaemonSet")["spec"]["template"]["spec"]
    assert _mounts(pod)["/run/libvirt"][1]["hostPath"]["path"] == "/run/libvirt"
    values = {"libvirt": {"uri": ""}}
    no_libvirt = one(render(chart, values), "DaemonSet")["spec"]["template"]["spec"]
    assert "/run/libvirt" not in _mounts(no_libvirt)


def _mounts(pod: Obj) -> dict[str, tuple[str, Obj]]:
    """mountPath -> (volume name, volume source) of the agent container."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    container = pod["containers"][0]
    return {m["mountPath"]: (m["name"], volumes[m["name"]]) for m in container["volumeMounts"]}


def test_daemonset_defaults(chart: helm.Chart) -> None:
    ds = one(render(chart), "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    pod = ds["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert agent["image"] == f"localhost/vmdisk-operator:{vmdisk.__version__}"
    assert agent["securityContext"]["privileged"] is True
    env = {e["name"]: e for e in agent["env"]}
    for name in ("NODE_NAME", "VMDISK_NODE_NAME"):
        assert env[name]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # The probes ask kopf's liveness endpoint, on the port given to --liveness.
    args = agent["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    assert "--metrics-port=9102" in args and "--log-format=json" in args
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"health": 8080, "metrics": 9102}
    for probe in (agent["livenessProbe"], agent["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    mounts = _mounts(pod)
    assert mounts["/var/lib/vmdisk"][1]["hostPath"]["path"] == "/var/lib/vmdisk"
    assert mounts["/dev"][1]["hostPath"]["path"] == "/dev"
    assert "/etc/ceph" not in mounts and "/run/lvm" not in mounts
    assert "checksum/config" in ds["spec"]["template"]["metadata"]["annotations"]
    # The run flags the chart passes exist.
    from vmdisk.cli import _parser

    _parser().parse_args(["run", *args])


def test_daemonset_with_everything_on(chart: helm.Chart) -> None:
    objects = render(chart, full_values())
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert "--metrics-port=9200" in agent["args"] and "--verbose" in agent["args"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "vmdisk.io/agent": "true"}
    assert "nodeAffinity" in pod["affinity"]
    mounts = _mounts(pod)
    assert mounts["/etc/ceph"][1]["secret"]["secretName"] == "ceph-client-vmdisk"
    for path in ("/run/lvm", "/run/lock/lvm", "/run/udev", "/etc/lvm"):
        assert mounts[path][1]["hostPath"]["path"] == path
    for path in ("/srv/images", "/var/lib/images"):
        name, volume = mounts[path]
        assert volume["hostPath"]["path"] == path
        mount = next(m for m in agent["volumeMounts"] if m["name"] == name)
        assert mount["readOnly"] is True
    service = one(objects, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_only_dev_must_exist_on_the_node(chart: helm.Chart) -> None:
    # A hostPath of type Directory that a node lacks keeps its pod in ContainerCreating:
    # every optional host path is created instead (the agent reports what is missing).
    for values in (full_values(), {"rbd": {"enabled": True}, "lvm": {"enabled": True}}):
        pod = one(render(chart, values), "DaemonSet")["spec"]["template"]["spec"]
        types = {
            v["hostPath"]["path"]: v["hostPath"].get("type")
            for v in pod["volumes"]
            if "hostPath" in v
        }
        assert types.pop("/dev") == "Directory"
        assert types and set(types.values()) == {"DirectoryOrCreate"}, types


def test_metrics_bind_address(chart: helm.Chart) -> None:
    from vmdisk.cli import _parser

    for values, address in (
        (None, "0.0.0.0"),
        ({"metrics": {"bindAddress": "127.0.0.1"}}, "127.0.0.1"),
    ):
        agent = one(render(chart, values), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
        assert f"--metrics-address={address}" in agent["args"]
        assert _parser().parse_args(["run", *agent["args"]]).metrics_address == address


def test_host_ceph_config_without_a_secret(chart: helm.Chart) -> None:
    pod = one(render(chart, {"rbd": {"enabled": True}}), "DaemonSet")["spec"]["template"]["spec"]
    assert _mounts(pod)["/etc/ceph"][1]["hostPath"]["path"] == "/etc/ceph"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"settings": {"defaultBackend": "zfs"}}, "defaultBackend"),
        ({"agent": {"logFormat": "xml"}}, "logFormat"),
        ({"settings": {"imageDirs": ["relative/dir"]}}, "imageDirs"),
        ({"metrics": {"port": 70000}}, "port"),
        ({"rbd": {"user": "client.vmdisk"}}, "user"),
        ({"unknownSetting": 1}, "unknownSetting"),
    ],
)
def test_schema_refuses_bad_values(chart: helm.Chart, values: Obj, field: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=field):
        chart.render(values, name="vmdisk", namespace="vmdisk-system")


def test_notes_tell_how_to_create_a_first_disk(chart: helm.Chart) -> None:
    notes = next(
        text
        for path, text in chart.render(None, name="vmdisk", namespace="ns").items()
        if path.endswith("NOTES.txt")
    )
    assert "kind: VMDisk" in notes and "libvirtXML" in notes
    # The node is one where an agent runs (not the first Node, often a tainted control
    # plane without one): the node of a Running pod of this release's DaemonSet.
    assert "get nodes" not in notes
    node = next(line for line in notes.splitlines() if "NODE=$(" in line)
    assert (
        "get pods -l app.kubernetes.io/instance=vmdisk,app.kubernetes.io/name=vmdisk-operator"
        in node
    )
    assert "--field-selector=status.phase=Running" in notes and ".spec.nodeName" in notes


def _notes(chart: helm.Chart, values: Obj | None) -> str:
    rendered = chart.render(values, name="vmdisk", namespace="ns")
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def test_notes_tell_how_to_load_the_local_image(chart: helm.Chart) -> None:
    image = f"localhost/vmdisk-operator:{vmdisk.__version__}"
    notes = _notes(chart, None)
    assert f"kind load docker-image {image}" in notes
    assert f"save {image} | sudo k3s ctr images import -" in notes
    assert "make image" in notes
    # An image from a registry needs no loading.
    assert "kind load" not in _notes(chart, {"image": {"repository": "registry.example/vmdisk"}})


# --- values.yaml documentation and README table -----------------------------

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][A-Za-z0-9]*):(?P<rest>.*)$")


def documented_values() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every value with a "# --" comment."""
    rows, path, comment = [], [], []
    documented: set[str] = set()
    lines = (CHART / "values.yaml").read_text().splitlines()
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped.removeprefix("# --").strip()]
            continue
        if stripped.startswith("#") and comment:
            comment.append(stripped.removeprefix("#").strip())
            continue
        m = _KEY.match(line)
        if not m:
            continue
        depth = len(m["indent"]) // 2
        path = [*path[:depth], m["key"]]
        key = ".".join(path)
        if comment:
            default = m["rest"].strip() or "(see values.yaml)"
            rows.append((key, default, " ".join(comment)))
            documented.add(key)
        elif m["rest"].strip() and not any(key.startswith(f"{d}.") for d in documented):
            raise AssertionError(f"values.yaml: {key} has no '# --' comment")
        comment = []
    return rows


def readme_table() -> str:
    lines = ["| Value | Default | Description |", "|---|---|---|"]
    for key, default, text in documented_values():
        lines.append(f"| `{key}` | `{default}` | {text} |")
    return "\n".join(lines)


def test_every_value_is_documented_and_in_the_readme() -> None:
    rows = documented_values()
    assert len(rows) > 30
    schema_top = set(yaml.safe_load((CHART / "values.schema.json").read_text())["properties"])
    assert {key.split(".")[0] for key, _, _ in rows} <= schema_top
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- values-table:begin -->", "<!-- values-table:end -->"
    assert begin in readme and end in readme, "README.md lacks the values table markers"
    current = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert current == readme_table(), "README.md's values table is stale; expected:\n" + (
        readme_table()
    )
