"""A real Kubernetes API server for the tests: etcd + kube-apiserver on loopback.

Load as a pytest plugin (``pytest_plugins = ["apiserver"]``).  The session
fixture ``kube_api`` starts, for each version in ``scripts/kube-versions.env``
(built by ``scripts/build-kube.sh`` into ``~/.cache/vmdisk-kube``), an etcd and a
kube-apiserver with a generated CA and serving certificate,
``--authorization-mode=RBAC``, a static token for the test admin
(``system:masters``), service-account signing keys, and an audit log of every
request.  It applies the CRDs with ``kubectl apply -f crds/`` (server-side
validation) and the RBAC objects the Helm chart renders; the agent logs in
with a token of the chart's ServiceAccount, so it has exactly the chart's
permissions.  Tests parametrised by version get one server per version.

``VMDISK_KUBE_VERSIONS="1.37.2"`` runs a subset while developing.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import ipaddress
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes.client
import kubernetes.watch
import pytest
import urllib3
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parent.parent
# Where scripts/build-kube.sh puts the binaries.
CACHE = Path(os.environ.get("VMDISK_KUBE_CACHE") or Path.home() / ".cache" / "vmdisk-kube")
CHART = ROOT / "charts" / "vmdisk-operator"
KUBECTL = Path(sys.executable).parent / "kubectl"
AGENT_NAMESPACE = "vmdisk-system"
RELEASE = "vmdisk"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
Obj = dict[str, Any]


def _versions_file() -> dict[str, str]:
    found = {}
    for line in (ROOT / "scripts" / "kube-versions.env").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip().strip('"')
    return found


def kube_versions() -> list[str]:
    """The Kubernetes versions the suite runs against (oldest first)."""
    chosen = os.environ.get("VMDISK_KUBE_VERSIONS") or _versions_file()["KUBE_VERSIONS"]
    return chosen.split()


def etcd_binary() -> Path:
    return CACHE / f"etcd-{_versions_file()['ETCD_VERSION']}" / "etcd"


def apiserver_binary(version: str) -> Path:
    return CACHE / f"kube-{version}" / "kube-apiserver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class KubectlError(Exception):
    """kubectl exited non-zero; the message is its stderr."""


# --- certificates -----------------------------------------------------------


def _pem_key(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(
    subject: str, key: Any, issuer: tuple[x509.Name, Any] | None, *, ca: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(directory: Path) -> dict[str, Path]:
    """A CA, the API server's serving certificate it signed, and service-account keys."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("vmdisk-test-ca", ca_key, None, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    serving = _cert("kube-apiserver", key, (ca.subject, ca_key), ca=False)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "ca": (ca.public_bytes(serialization.Encoding.PEM)),
        "serving-cert": serving.public_bytes(serialization.Encoding.PEM),
        "serving-key": _pem_key(key),
        "sa-key": _pem_key(sa_key),
        "sa-pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    paths = {}
    for name, data in files.items():
        path = directory / f"{name}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return paths


# --- the server ---------------------------------------------------------------

AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # Who, what, and the response code; a watch is logged when it starts
    # (ResponseStarted) and again when it ends.
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


@dataclass
class KubeApiServer:
    """A running etcd + kube-apiserver pair, and the credentials to use it."""

    version: str
    workdir: Path
    url: str = ""
    ca_file: Path = field(default_factory=Path)
    admin_kubeconfig: Path = field(default_factory=Path)
    agent_kubeconfig: Path = field(default_factory=Path)
    namespace: str = AGENT_NAMESPACE
    agent_user: str = ""
    audit_log: Path = field(default_factory=Path)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    agent_token: str = ""

    @property
    def kubeconfigs(self) -> dict[str, Path]:
        return {"admin": self.admin_kubeconfig, "agent": self.agent_kubeconfig}

    def kubectl(
        self,
        *args: str,
        identity: str = "admin",
        stdin: str | None = None,
        timeout: float = 120,
    ) -> str:
        """Run kubectl as ``identity`` ("admin" or "agent"); KubectlError on failure."""
        result = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfigs[identity]), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise KubectlError(result.stderr.strip())
        return result.stdout

    def apply(self, objects: list[Obj], *args: str) -> str:
        return self.kubectl("apply", "-f", "-", *args, stdin=yaml.safe_dump_all(objects))

    def apply_crds(self) -> None:
        """``kubectl apply -f crds/`` (server-side validation), then wait until served."""
        self.kubectl("apply", "-f", str(ROOT / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")

    @contextlib.contextmanager
    def permissive_crds(self) -> Iterator[None]:
        """Our CRDs without a schema for the block, as an old or hand-edited CRD would be.

        Objects written meanwhile stay as they are when the real CRDs return:
        the API server validates writes, never what is stored.
        """
        lax = []
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            for version in crd["spec"]["versions"]:
                version["schema"] = {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                }
                version.pop("additionalPrinterColumns", None)
            lax.append(crd)
        self.apply(lax)
        self._wait(lambda: self._accepts_unknown_fields(), "the schema-less CRD", timeout=30)
        try:
            yield
        finally:
            self.apply_crds()
            self._wait(lambda: not self._accepts_unknown_fields(), "the real CRD", timeout=30)

    @property
    def selects_fields(self) -> bool:
        """Whether this version serves CRD ``selectableFields`` (beta, on by default, in 1.31)."""
        return tuple(int(p) for p in self.version.split(".")[:2]) >= (1, 31)

    def selectable_crds(self) -> list[Obj]:
        """The CRDs of ``vmdisk crds --selectable-fields`` (spec.nodeName selectable)."""
        argv = [sys.executable, "-m", "vmdisk.cli", "crds", "--selectable-fields"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
        return [crd for crd in yaml.safe_load_all(out.stdout) if crd]

    @contextlib.contextmanager
    def node_selectable_crds(self) -> Iterator[None]:
        """The CRDs with spec.nodeName selectable, until the block ends; the usual ones after."""
        self.apply(self.selectable_crds())
        self._wait(lambda: self._selects_node(), "the selectable CRD", timeout=30)
        try:
            yield
        finally:
            self.apply_crds()
            self._wait(lambda: not self._selects_node(), "the usual CRD", timeout=30)

    def _selects_node(self) -> bool:
        try:
            self.kubectl("get", "vmdisks", "-A", "--field-selector", "spec.nodeName=probe")
        except KubectlError:
            return False
        return True

    def _accepts_unknown_fields(self) -> bool:
        """Whether the served VMDisk schema takes anything (a server-side dry run)."""
        probe = {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDisk",
            "metadata": {"name": "schema-probe", "namespace": "default"},
            "spec": {"size": "lots"},
        }
        try:
            self.kubectl("create", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(probe))
        except KubectlError:
            return False
        return True

    def audit(self) -> list[Obj]:
        """Every request the server answered so far (open watches too), oldest first."""
        latest: dict[str, Obj] = {}  # auditID -> its last stage
        with open(self.audit_log, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    event = json.loads(line)
                    latest[event["auditID"]] = event
        return sorted(latest.values(), key=lambda e: str(e["requestReceivedTimestamp"]))

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> KubeApiServer:
        for binary in (etcd_binary(), apiserver_binary(self.version)):
            if not binary.exists():
                pytest.fail(f"{binary} is missing: run ./scripts/setup.sh (builds it)")
        pki = write_pki(self.workdir / "pki")
        self.ca_file = pki["ca"]
        etcd_url = self._start_etcd()
        self._start_apiserver(etcd_url, pki)
        self.admin_kubeconfig = self._kubeconfig("admin", self.admin_token)
        self._wait_ready()
        self.kubectl("create", "namespace", self.namespace)
        self._install_chart_rbac()
        self.apply_crds()
        return self

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            [
                str(etcd_binary()),
                "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync", "--log-level", "warn",
            ],
        )  # fmt: skip
        self._wait(lambda: _http_ok(f"{url}/health"), "etcd")
        return url

    def _start_apiserver(self, etcd_url: str, pki: dict[str, Path]) -> None:
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f"{self.admin_token},vmdisk-test-admin,admin,system:masters\n")
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self.audit_log = self.workdir / "audit.log"
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        self._spawn(
            "kube-apiserver",
            [
                str(apiserver_binary(self.version)),
                "--etcd-servers", etcd_url,
                "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                "--secure-port", str(port),
                # No "kubernetes" Service endpoints: they may not be loopback
                # addresses (refused from 1.3x on), and nothing here needs them.
                "--endpoint-reconciler-type", "none",
                "--tls-cert-file", str(pki["serving-cert"]),
                "--tls-private-key-file", str(pki["serving-key"]),
                "--cert-dir", str(self.workdir / "certs"),
                "--token-auth-file", str(tokens),
                "--authorization-mode", "RBAC",
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-account-key-file", str(pki["sa-pub"]),
                "--service-account-signing-key-file", str(pki["sa-key"]),
                "--service-cluster-ip-range", "10.96.0.0/24",
                # The chart's agent runs privileged, as a storage DaemonSet must.
                "--allow-privileged",
                "--audit-policy-file", str(policy),
                "--audit-log-path", str(self.audit_log),
                "--audit-log-format", "json", "--audit-log-mode", "blocking",
                "--profiling=false",
            ],
        )  # fmt: skip

    def _wait_ready(self) -> None:
        http = urllib3.PoolManager(ca_certs=str(self.ca_file))
        headers = {"Authorization": f"Bearer {self.admin_token}"}

        def ready() -> bool:
            try:
                resp = http.request(
                    "GET", f"{self.url}/readyz", headers=headers, timeout=2, retries=False
                )
            except urllib3.exceptions.HTTPError:
                return False
            return resp.status == 200

        self._wait(ready, "kube-apiserver", timeout=120)
        http.clear()

    def _wait(self, check: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for proc in self.procs:
                if proc.poll() is not None:
                    pytest.fail(f"{what} exited ({proc.returncode}):\n{self.logs(what)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not ready after {timeout} s:\n{self.logs(what)}")
            time.sleep(0.2)

    def logs(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def _kubeconfig(self, user: str, token: str) -> Path:
        path = self.workdir / f"{user}.kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _install_chart_rbac(self) -> None:
        """The chart's ServiceAccount and RBAC, and a token of that account for the agent."""
        objects = rendered_chart(namespace=self.namespace)
        rbac = [o for o in objects if o["kind"] in RBAC_KINDS]
        self.apply(rbac)
        account = next(o for o in rbac if o["kind"] == "ServiceAccount")["metadata"]["name"]
        self.agent_user = f"system:serviceaccount:{self.namespace}:{account}"
        self.agent_token = self.kubectl(
            "create", "token", account, "-n", self.namespace, "--duration", "48h"
        ).strip()
        self.agent_kubeconfig = self._kubeconfig("agent", self.agent_token)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the API server first, then etcd
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)


def _http_ok(url: str) -> bool:
    try:
        return urllib3.request("GET", url, timeout=1, retries=False).status == 200
    except urllib3.exceptions.HTTPError:
        return False


def rendered_chart(values: Obj | None = None, *, namespace: str = AGENT_NAMESPACE) -> list[Obj]:
    """Every object the chart renders (NOTES.txt aside), as release ``vmdisk`` in ``namespace``."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if not path.endswith("NOTES.txt"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


@pytest.fixture(scope="session", params=kube_versions(), ids=lambda v: f"kube-{v}")
def kube_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubeApiServer]:
    """A real API server for this session (one per Kubernetes version)."""
    version = request.param
    server = KubeApiServer(version, tmp_path_factory.mktemp(f"kube-{version}"))
    try:
        yield server.start()
    finally:
        server.stop()


# --- a test's own namespace ---------------------------------------------------

CORE = {"events", "secrets", "configmaps", "serviceaccounts"}
CLUSTER = {"vmdiskclasses", "nodes", "namespaces"}


class Kube:
    """A synchronous client for one test namespace, as the admin (the kubernetes client).

    ``history(plural, name)`` is every version of an object the server
    published since the namespace was made, from a watch (so every status the
    agent wrote, in order).
    """

    Error = ApiException

    def __init__(self, server: KubeApiServer, namespace: str) -> None:
        self.server, self.namespace = server, namespace
        self.started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        config = kubernetes.client.Configuration()
        config.host = server.url
        config.ssl_ca_cert = str(server.ca_file)
        config.api_key = {"BearerToken": server.admin_token}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        self.client = kubernetes.client.ApiClient(config)
        self._seen: dict[tuple[str, str], list[Obj]] = {}
        self._watches: list[tuple[threading.Event, threading.Thread]] = []
        self._cluster_objects: list[tuple[str, str]] = []

    def path(self, plural: str, name: str | None = None, namespace: str | None = None) -> str:
        base = (
            "/api/v1"
            if plural in CORE or plural in CLUSTER - {"vmdiskclasses"}
            else ("/apis/vmdisk.io/v1alpha1")
        )
        if plural not in CLUSTER:
            base += f"/namespaces/{namespace or self.namespace}"
        return f"{base}/{plural}" + (f"/{name}" if name else "")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        """One request; the answer as a dict, or `Kube.Error` (ApiException) on a refusal."""
        resp = self._send(method, path, body, content_type=content_type, query=query)
        resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(http_resp=resp, body=resp.data.decode(), data=None)
        return json.loads(resp.data) if resp.data else None

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type or "application/json"}
        serialized = self.client.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )  # fmt: skip
        return self.client.call_api(*serialized)

    def create(self, obj: Obj, *, strict: bool = True) -> Obj:
        """Create ``obj`` in this namespace, unknown fields refused unless ``strict`` is off."""
        plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
        if plural in CLUSTER:  # removed again when the test ends
            self._cluster_objects.append((plural, obj["metadata"]["name"]))
        else:
            obj = {**obj, "metadata": {**obj["metadata"], "namespace": self.namespace}}
        query = [("fieldValidation", "Strict" if strict else "Ignore")]
        return dict(self.request("POST", self.path(plural), obj, query=query))

    def dry_run_create(self, obj: Obj) -> Obj:
        """What the server would store for ``obj`` (``dryRun=All``, strict fields)."""
        plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
        body = copy.deepcopy(obj)
        if plural not in CLUSTER:
            body["metadata"]["namespace"] = self.namespace
        query = [("dryRun", "All"), ("fieldValidation", "Strict")]
        return dict(self.request("POST", self.path(plural), body, query=query))

    def get(self, plural: str, name: str, namespace: str | None = None) -> Obj | None:
        try:
            return dict(self.request("GET", self.path(plural, name, namespace)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, plural: str, namespace: str | None = None, **params: str) -> list[Obj]:
        found = self.request(
            "GET", self.path(plural, namespace=namespace), query=list(params.items())
        )
        return list(found["items"])

    def patch(self, plural: str, name: str, patch: Obj, *, subresource: str = "") -> Obj:
        path = self.path(plural, name) + (f"/{subresource}" if subresource else "")
        return dict(self.request(
            "PATCH", path, patch, content_type="application/merge-patch+json",
            query=[("fieldValidation", "Strict")],
        ))  # fmt: skip

    def delete(self, plural: str, name: str) -> None:
        try:
            self.request("DELETE", self.path(plural, name))
        except ApiException as exc:
            if exc.status != 404:
                raise

    def wait_for(
        self, plural: str, name: str, check: Callable[[Obj | None], bool], timeout: float = 30
    ) -> Obj | None:
        """Poll until ``check(object or None)`` holds; the object, or an AssertionError."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get(plural, name)
            if check(obj):
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(f"{plural}/{name} after {timeout} s: {json.dumps(obj)[:3000]}")
            time.sleep(0.1)

    # --- recording ------------------------------------------------------------

    def record(self, plural: str) -> None:
        """Start keeping every version of ``plural`` objects in this namespace."""
        path = self.path(plural)
        stop = threading.Event()

        def current() -> str:
            return str(self.request("GET", path)["metadata"]["resourceVersion"])

        def run() -> None:
            version = current()
            while not stop.is_set():
                query = [
                    ("watch", "true"), ("resourceVersion", version),
                    ("allowWatchBookmarks", "true"), ("timeoutSeconds", "5"),
                ]  # fmt: skip
                try:
                    response = self._send("GET", path, query=query).response
                    try:
                        version = self._follow(plural, response, stop, version, current)
                    finally:
                        response.release_conn()
                except (urllib3.exceptions.HTTPError, ApiException, ValueError):
                    # A dropped watch or a cut-off line: resume from the last version.
                    stop.wait(0.2)

        thread = threading.Thread(target=run, daemon=True, name=f"watch-{plural}")
        thread.start()
        self._watches.append((stop, thread))

    def _follow(
        self,
        plural: str,
        response: Any,
        stop: threading.Event,
        version: str,
        current: Callable[[], str],
    ) -> str:
        """Record one watch response's events; the version to resume from."""
        for line in kubernetes.watch.watch.iter_resp_lines(response):
            if stop.is_set():
                break
            if not line.strip():
                continue
            event = json.loads(line)
            obj = event["object"]
            if event["type"] == "ERROR":
                # 410: our version was compacted away, start from now;
                # anything else: resume where we were.
                return current() if obj.get("code") == 410 else version
            version = obj["metadata"]["resourceVersion"]
            if event["type"] != "BOOKMARK":
                self._seen.setdefault((plural, obj["metadata"]["name"]), []).append(obj)
        return version

    def history(self, plural: str, name: str) -> list[Obj]:
        return list(self._seen.get((plural, name), []))

    def close(self) -> None:
        for stop, _ in self._watches:
            stop.set()  # each thread ends at its next event or watch timeout
        self.client.close()


_namespaces = itertools.count(1)


@pytest.fixture
def kube(kube_api: KubeApiServer, request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A fresh namespace for this test, its VMDisks and DiskSnapshots recorded.

    At the end, what the test left behind is removed (finalizers too: the
    agents have stopped), so the next test starts from an empty cluster.
    """
    name = f"t{next(_namespaces)}-{request.node.originalname.removeprefix('test_')}"[:63]
    name = name.replace("_", "-").rstrip("-")
    kube_api.kubectl("create", "namespace", name)
    client = Kube(kube_api, name)
    for plural in ("vmdisks", "disksnapshots"):
        client.record(plural)
    try:
        yield client
    finally:
        for plural in ("disksnapshots", "vmdisks"):
            for obj in client.list(plural):
                meta = obj["metadata"]
                if meta.get("finalizers"):
                    client.patch(plural, meta["name"], {"metadata": {"finalizers": None}})
                client.delete(plural, meta["name"])
        for plural, obj_name in client._cluster_objects:
            client.delete(plural, obj_name)
        client.close()
