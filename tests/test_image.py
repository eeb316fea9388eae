"""The container image, built by `make image`'s script and run as the node agent.

The agent container is what the chart's DaemonSet runs: the rendered pod's args,
settings (ConfigMap), environment, host mounts (the state dir at its own path, /dev
with HostToContainer propagation) and privileged security context, translated to the
container engine's flags; the ServiceAccount token and CA mounted where a pod gets them,
so the agent logs in exactly as in a pod, with exactly the chart's RBAC. It differs from a
pod in one respect: host networking, because the suite's API server and image server
listen on loopback. It provisions a qcow2 disk from an HTTP image and a blank disk
against the real API server; their libvirt XML is started in the real libvirtd.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from agents import free_port
from conftest import PATTERN, qemu_read, sha256_of
from httpserver import ImageServer
from libvirtd import OpenedImage, boot_and_inspect

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "vmdisk-operator"
NODE = "image-node"
NAMESPACE = "image-test"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Kept in step with scripts/image.sh: what podman needs on this kind of host.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
Obj = dict[str, Any]

pytestmark = [pytest.mark.slow, pytest.mark.libvirtd]


@dataclass(frozen=True)
class Image:
    name: str
    id: str
    size: int
    engine: str

    def engine_argv(self) -> list[str]:
        return PODMAN if self.engine == "podman" else ["docker"]


@pytest.fixture(scope="session")
def agent_image(pytestconfig: pytest.Config) -> Image:
    """The image `make image` builds (its cached script), named on the terminal."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "image.sh")], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-4000:]
    name, image_id, size, engine = result.stdout.split()
    image = Image(name, image_id, int(size), engine)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nagent image {image.name}: ID {image.id}, {image.size / 1e6:.0f} MB ({engine})")
    return image


def daemonset_pod(values: Obj) -> Obj:
    """The agent pod template the chart renders with ``values``, and its ConfigMap."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="vmdisk", namespace="vmdisk-system")
    objects = [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    daemonset = next(o for o in objects if o.get("kind") == "DaemonSet")
    configmap = next(o for o in objects if o.get("kind") == "ConfigMap")
    pod: Obj = daemonset["spec"]["template"]["spec"]
    pod["configData"] = configmap["data"]
    return pod


def pod_to_flags(pod: Obj, fields: dict[str, str]) -> list[str]:
    """The engine flags that give a container what the pod spec gives the agent."""
    (container,) = pod["containers"]
    flags: list[str] = []
    for key, value in pod["configData"].items():
        flags += ["--env", f"{key}={value}"]
    for env in container.get("env", []):
        if "value" in env:
            flags += ["--env", f"{env['name']}={env['value']}"]
        else:  # the downward API, as the kubelet fills it in
            field = env["valueFrom"]["fieldRef"]["fieldPath"]
            flags += ["--env", f"{env['name']}={fields[field]}"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            flags += ["--tmpfs", mount["mountPath"]]
            continue
        options = ["ro" if mount.get("readOnly") else "rw"]
        if mount.get("mountPropagation") == "HostToContainer":
            options.append("rslave")
        host, kind = volume["hostPath"]["path"], volume["hostPath"].get("type", "")
        if kind == "DirectoryOrCreate":  # what the kubelet does
            Path(host).mkdir(mode=0o755, parents=True, exist_ok=True)
        elif kind == "Directory":  # the kubelet would keep the pod in ContainerCreating
            assert Path(host).is_dir(), f"hostPath {host} is not a directory"
        flags += ["--volume", f"{host}:{mount['mountPath']}:{','.join(options)}"]
    if container["securityContext"].get("privileged"):
        flags.append("--privileged")
    return flags


def _token(kubeconfig: Path) -> str:
    config = yaml.safe_load(kubeconfig.read_text())
    return str(config["users"][0]["user"]["token"])


@dataclass
class AgentContainer:
    image: Image
    name: str
    health_port: int
    state: Path

    def run(self, *args: str) -> str:
        argv = [*self.image.engine_argv(), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        return result.stdout

    def logs(self) -> str:
        argv = [*self.image.engine_argv(), "logs", self.name]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def running(self) -> bool:
        return self.run("inspect", "--format", "{{.State.Running}}", self.name).strip() == "true"


@pytest.fixture
def agent_container(agent_image: Image, kube_api: Any, tmp_path: Path) -> Iterator[AgentContainer]:
    """The agent image running as the chart's DaemonSet pod on node ``NODE``."""
    state = tmp_path / "state"
    health, metrics = free_port(), free_port()
    pod = daemonset_pod(
        {
            "settings": {"stateDir": str(state)},
            "health": {"port": health},
            "metrics": {"port": metrics},
            # The test's image server listens on loopback, which the default refuses.
            "agent": {"extraEnv": [{"name": "VMDISK_IMAGE_HOSTS", "value": "127.0.0.1/32"}]},
        }
    )
    secrets_dir = tmp_path / "serviceaccount"
    secrets_dir.mkdir()
    (secrets_dir / "token").write_text(_token(kube_api.agent_kubeconfig))
    (secrets_dir / "ca.crt").write_bytes(Path(kube_api.ca_file).read_bytes())
    (secrets_dir / "namespace").write_text(kube_api.namespace)
    host, port = kube_api.url.removeprefix("https://").rsplit(":", 1)
    name = f"vmdisk-agent-test-{secrets.token_hex(4)}"
    container = AgentContainer(agent_image, name, health, state)
    (c,) = pod["containers"]
    container.run(
        "run", "--detach", "--name", name, "--network", "host",
        *(ULIMITS if agent_image.engine == "podman" else []),
        *pod_to_flags(pod, {"spec.nodeName": NODE, "metadata.namespace": kube_api.namespace}),
        "--volume", f"{secrets_dir}:{SA_DIR}:ro",
        "--env", f"KUBERNETES_SERVICE_HOST={host.strip('[]')}",
        "--env", f"KUBERNETES_SERVICE_PORT={port}",
        agent_image.name, *c["args"],
    )  # fmt: skip
    try:
        yield container
    finally:
        logs = container.logs()
        container.run("stop", "--time", "15", name)
        container.run("rm", name)
        assert "Traceback" not in logs, logs


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def kubectl_json(kube_api: Any, *args: str) -> Obj | None:
    try:
        out = kube_api.kubectl("get", "-o", "json", *args)
    except Exception as error:  # kubectl failed: NotFound is the only expected one
        if "NotFound" in str(error) or "not found" in str(error):
            return None
        raise
    obj: Obj = json.loads(out)
    return obj


def wait_for(
    kube_api: Any, container: AgentContainer, name: str, check: Any, timeout: float = 180
) -> Obj | None:
    deadline = time.monotonic() + timeout
    while True:
        obj = kubectl_json(kube_api, "--namespace", NAMESPACE, f"vmdisks.vmdisk.io/{name}")
        if check(obj):
            return obj
        if time.monotonic() > deadline or not container.running():
            pytest.fail(f"vmdisk {name}: {json.dumps(obj, indent=1)}\n{container.logs()[-6000:]}")
        time.sleep(1)


def ready(obj: Obj | None) -> bool:
    return ((obj or {}).get("status") or {}).get("phase") in ("Ready", "Failed")


def test_the_image_runs_as_the_node_agent(
    agent_image: Image,
    agent_container: AgentContainer,
    kube_api: Any,
    image_dir: Path,
    libvirt_system: Any,
) -> None:
    base = image_dir / "base.qcow2"
    with ImageServer() as server:
        url = server.add("/base.qcow2", base.read_bytes())
        kube_api.kubectl("create", "namespace", NAMESPACE)
        disks = [
            {
                "apiVersion": "vmdisk.io/v1alpha1",
                "kind": "VMDisk",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"nodeName": NODE, "backend": "qcow2", "size": "32Mi", **spec},
            }
            for name, spec in [
                ("root", {"source": {"image": {"url": url, "checksum": sha256_of(base)}}}),
                ("data", {"source": {"blank": {}}, "libvirt": {"target": "vdb"}}),
            ]
        ]
        kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(disks))
        root = wait_for(kube_api, agent_container, "root", ready)
        data = wait_for(kube_api, agent_container, "data", ready)
    assert root and data
    state = agent_container.state
    for obj in (root, data):
        status = obj["status"]
        assert status["phase"] == "Ready", status
        assert (status["nodeName"], status["backend"], status["format"]) == (NODE, "qcow2", "qcow2")
        assert status["virtualSize"] == 32 * 1024 * 1024
        assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "True"
        assert f"vmdisk.io/{NODE}" in obj["metadata"]["finalizers"]
        # The agent's path is the host's (the chart mounts the state dir at its own path).
        assert Path(status["path"]).is_file(), status["path"]
    # QEMU under the host's libvirtd opens what the XML names: the image disk over its
    # cached base, the blank disk alone.
    root_chain = boot_and_inspect(libvirt_system, root["status"]["libvirtXML"])
    assert root_chain[0] == OpenedImage(root["status"]["path"], "qcow2")
    assert len(root_chain) == 2 and root_chain[1].filename.startswith(str(state / "cache"))
    assert root["status"]["baseImage"] in root_chain[1].filename
    data_chain = boot_and_inspect(libvirt_system, data["status"]["libvirtXML"])
    assert [(i.filename, i.format) for i in data_chain] == [(data["status"]["path"], "qcow2")]
    root_path = Path(root["status"]["path"])
    for offset, expected in PATTERN.items():
        assert qemu_read(root_path, "qcow2", offset, len(expected)) == expected
    assert _healthy(agent_container.health_port)

    kube_api.kubectl(
        "delete", "--namespace", NAMESPACE, "--wait=false",
        "vmdisks.vmdisk.io/root", "vmdisks.vmdisk.io/data",
    )  # fmt: skip
    for name in ("root", "data"):
        wait_for(kube_api, agent_container, name, lambda o: o is None, timeout=120)
    assert not root_path.exists()
    assert not Path(data["status"]["path"]).exists()
    assert agent_container.running()
