"""containerDisks from a real registry: oci:// (and docker://) image sources end to end.

The registry is Debian's docker-registry (CNCF distribution v2) on loopback,
anonymous or behind its own token auth (``registry.TokenServer`` signs the
JWTs it verifies); images are pushed with Debian's skopeo from OCI layouts
built here; disks are made by the real engine and compared with qemu-img.
"""

from __future__ import annotations

import base64
import json
import platform
import random
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents import Agent, phase, vmdisk
from apiserver import AGENT_NAMESPACE, Kube
from conftest import Manifest
from httpserver import ImageServer
from registry import OCI_MANIFEST, OciLayout, Registry, TokenServer, layer_tar, tls_certificate
from vmdisk.api.vmdisk import VMDisk, VMDiskStatus
from vmdisk.api.vmdiskclass import VMDiskClass
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import LocalStore

MiB = 1024 * 1024
# The node's platform as the OCI spec spells it, read here independently of the agent.
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if ARCH != "arm64" else "amd64"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def qcow2(image_dir: Path) -> Path:
    return image_dir / "base.qcow2"


def oci_class(store: LocalStore, reg: Registry, name: str = "oci", **sources: Any) -> str:
    spec = {
        "backend": "qcow2",
        "imageSources": {
            "allowedHosts": ["127.0.0.1/32"],
            "plainHttpRegistries": [reg.host],
            **sources,
        },
    }
    store.apply(VMDiskClass.model_validate({"metadata": {"name": name}, "spec": spec}))
    return name


def make(
    runner: LocalRunner, disk: Manifest, name: str, url: str, klass: str, **image: Any
) -> VMDiskStatus:
    """Store the disk, reconcile it once (as local mode does), return its status."""
    obj = disk(name, "qcow2", source={"image": {"url": url, **image}}, className=klass)
    done = runner.reconcile(runner.store.apply(obj))
    assert isinstance(done, VMDisk) and done.status is not None
    return done.status


def same_content(a: Path, b: Path) -> bool:
    return (
        subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True).returncode == 0
    )


def push_disk(reg: Registry, tmp_path: Path, ref: str, files: dict[str, bytes], **kw: Any) -> str:
    """Push a one-layer image holding ``files``; return the registry's digest of it."""
    layout = OciLayout(tmp_path / f"layout-{ref.replace('/', '_').replace(':', '_')}")
    compress = kw.pop("compress", None)
    layout.tag("t", layout.image(layer_tar(files, compress=compress, **kw), arch=ARCH))
    reg.push(layout, "t", ref)
    return reg.digest(ref)


def test_disk_by_tag_by_digest_and_docker_scheme(
    engine: Engine,
    store: LocalStore,
    runner: LocalRunner,
    disk: Manifest,
    registry: Registry,
    qcow2: Path,
    tmp_path: Path,
) -> None:
    digest = push_disk(registry, tmp_path, "vms/base:v1", {"disk/base.qcow2": qcow2.read_bytes()})
    klass = oci_class(store, registry)
    by_tag = make(runner, disk, "by-tag", registry.url("vms/base:v1"), klass)
    assert by_tag.phase == "Ready", by_tag.conditions
    assert by_tag.image_digest == digest
    assert by_tag.path is not None and same_content(Path(by_tag.path), qcow2)
    by_digest = make(runner, disk, "by-digest", registry.url(f"vms/base@{digest}"), klass)
    assert by_digest.phase == "Ready", by_digest.conditions
    assert (by_digest.image_digest, by_digest.base_image) == (digest, by_tag.base_image)
    docker = f"docker://{registry.host}/vms/base:v1"
    cdi = make(runner, disk, "cdi", docker, klass)
    assert cdi.phase == "Ready", cdi.conditions
    # Three disks, one layer: one blob GET.
    layer = next(iter(engine.cache.root.glob("layers/layer-*"))).name.removeprefix("layer-")
    assert registry.blob_gets(f"sha256:{layer}") == 1
    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmdisk.cli",
            "cache",
            "list",
            "--state-dir",
            str(engine.settings.state_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    row = listing.stdout.splitlines()[1].split()
    assert row[0] == by_tag.base_image and "oci" in row and row[-1] == registry.url("vms/base:v1")


def manifest_of(registry: Registry, ref: str) -> dict[str, Any]:
    argv = ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{ref}"]
    return dict(json.loads(subprocess.run(argv, capture_output=True, check=True).stdout))


def test_a_docker_schema_2_image(
    runner: LocalRunner, disk: Manifest, registry: Registry, qcow2: Path, tmp_path: Path
) -> None:
    layout = OciLayout(tmp_path / "layout")
    layout.tag("t", layout.image(layer_tar({"disk/a.qcow2": qcow2.read_bytes()}), arch=ARCH))
    registry.push(layout, "t", "vms/docker:v1", docker_v2=True)
    served = manifest_of(registry, "vms/docker:v1")
    assert served["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert served["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    status = make(
        runner, disk, "docker", registry.url("vms/docker:v1"), oci_class(runner.store, registry)
    )
    assert status.phase == "Ready", status.conditions
    assert status.path is not None and same_content(Path(status.path), qcow2)


@pytest.mark.parametrize(
    "url",
    [
        "oci://registry.example",  # no repository
        "oci://registry.example/Upper/Case",
        "oci://registry.example/a/../b",
        "oci://user:pw@registry.example/a",
        "oci://registry.example/a:bad/tag",
        "oci://registry.example/a@sha256:abc",
        "oci://registry.example/a@md5:" + "0" * 32,
        "oci://registry.example/a?x=1",
        "oci://registry.example:99999x/a",
    ],
)
def test_malformed_references_are_refused_before_any_request(
    runner: LocalRunner, disk: Manifest, registry: Registry, url: str
) -> None:
    status = make(runner, disk, "bad-ref", url, oci_class(runner.store, registry))
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "SourceNotAllowed")
    assert "spec.source.image.url" in status.conditions[-1].message
    assert "GET " not in registry.log.read_text()  # the registry never heard of it


def raw_image(tmp_path: Path, name: str, marker: bytes) -> Path:
    path = tmp_path / f"{name}.raw"
    with open(path, "wb") as handle:
        handle.truncate(4 * MiB)
        handle.write(marker)
    return path


@pytest.mark.parametrize("docker_v2", [False, True], ids=["oci-index", "docker-manifest-list"])
def test_multi_arch_index_picks_this_nodes_platform(
    runner: LocalRunner, disk: Manifest, registry: Registry, tmp_path: Path, docker_v2: bool
) -> None:
    ours, theirs = raw_image(tmp_path, "ours", b"ours"), raw_image(tmp_path, "theirs", b"theirs")
    layout = OciLayout(tmp_path / "multi")
    images = [
        layout.image(layer_tar({"disk/disk.raw": theirs.read_bytes()}), arch=OTHER_ARCH),
        layout.image(layer_tar({"disk/disk.raw": ours.read_bytes()}), arch=ARCH),
    ]
    layout.tag("multi", layout.index(images))
    layout.tag("foreign", layout.index(images[:1]))
    registry.push(layout, "multi", "vms/multi:v1", all_images=True, docker_v2=docker_v2)
    registry.push(layout, "foreign", "vms/multi:foreign", all_images=True, docker_v2=docker_v2)
    top = manifest_of(registry, "vms/multi:v1")
    wanted = "manifest.list.v2" if docker_v2 else "image.index.v1"
    assert wanted in top["mediaType"]  # what the registry really serves
    klass = oci_class(runner.store, registry)
    status = make(runner, disk, "multi", registry.url("vms/multi:v1"), klass)
    assert status.phase == "Ready", status.conditions
    assert status.path is not None and same_content(Path(status.path), ours)
    assert status.image_digest == registry.digest("vms/multi:v1")  # the index's own digest
    status = make(runner, disk, "foreign", registry.url("vms/multi:foreign"), klass)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "ContainerDiskInvalid")
    assert f"linux/{ARCH}" in status.conditions[-1].message
    assert f"linux/{OTHER_ARCH}" in status.conditions[-1].message


@pytest.fixture
def private(tmp_path: Path, qcow2: Path) -> Iterator[tuple[Registry, TokenServer]]:
    """A registry with token auth holding ``private/disk:v1``, pushed as ``puller``."""
    tokens = TokenServer(tmp_path, {"puller": "secret"})
    try:
        with Registry(tmp_path / "registry", token=tokens) as registry:
            layout = OciLayout(tmp_path / "layout")
            layout.tag(
                "t", layout.image(layer_tar({"disk/a.qcow2": qcow2.read_bytes()}), arch=ARCH)
            )
            registry.push(layout, "t", "private/disk:v1", creds="puller:secret")
            yield registry, tokens
    finally:
        tokens.close()


def test_bearer_token_auth_with_the_class_credentials(
    runner: LocalRunner,
    disk: Manifest,
    qcow2: Path,
    settings: Settings,
    private: tuple[Registry, TokenServer],
) -> None:
    registry, tokens = private
    url = registry.url("private/disk:v1")
    anonymous = make(runner, disk, "anon", url, oci_class(runner.store, registry, "anon"))
    assert (anonymous.phase, anonymous.conditions[-1].reason) == (
        "Pending",  # retried: an administrator may fix the Secret
        "RegistryAuthFailed",
    )
    assert "registryCredentialsRef" in anonymous.conditions[-1].message
    assert "" in tokens.issued  # the challenge was followed, anonymously
    secret = settings.state_dir / "secrets" / settings.namespace / "regcreds"
    secret.mkdir(parents=True)
    config = secret / ".dockerconfigjson"
    pair = base64.b64encode(b"puller:wrong").decode()
    config.write_text(json.dumps({"auths": {f"http://{registry.host}": {"auth": pair}}}))
    creds = oci_class(runner.store, registry, "creds", registryCredentialsRef={"name": "regcreds"})
    wrong = make(runner, disk, "wrong", url, creds)
    assert (wrong.phase, wrong.conditions[-1].reason) == ("Pending", "RegistryAuthFailed")
    assert "regcreds" in wrong.conditions[-1].message
    config.write_text(
        json.dumps({"auths": {registry.host: {"username": "puller", "password": "secret"}}})
    )
    good = make(runner, disk, "good", url, creds)
    assert good.phase == "Ready", good.conditions
    assert good.path is not None and same_content(Path(good.path), qcow2)
    assert tokens.issued.count("puller") >= 1


def hostile(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    ("files", "members", "reason"),
    [
        ({"disk/a.raw": b"x" * 4096}, [hostile("../escape")], "ImageUnsafe"),
        ({"disk/a.raw": b"x" * 4096}, [hostile("disk/../../escape")], "ImageUnsafe"),
        ({"disk/a.raw": b"x" * 4096}, [hostile("/etc/escape")], "ImageUnsafe"),
        ({}, [hostile("disk/a.raw", tarfile.SYMTYPE, "/etc/passwd")], "ImageUnsafe"),
        (
            {"disk/a.raw": b"x" * 4096},
            [hostile("disk/b", tarfile.LNKTYPE, "disk/a.raw")],
            "ImageUnsafe",
        ),
        ({"disk/a.raw": b"x" * 4096}, [hostile("dev/sda", tarfile.BLKTYPE)], "ImageUnsafe"),
        ({"disk/a.raw": b"x" * 4096, "disk/b.raw": b"y" * 4096}, [], "ContainerDiskInvalid"),
        ({"other/a.raw": b"x" * 4096}, [], "ContainerDiskInvalid"),
    ],
    ids=[
        "dotdot",
        "inner-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "device",
        "two-disks",
        "no-disk",
    ],
)
def test_hostile_or_wrong_layers_are_refused_and_leave_nothing(
    runner: LocalRunner,
    disk: Manifest,
    registry: Registry,
    tmp_path: Path,
    files: dict[str, bytes],
    members: list[tarfile.TarInfo],
    reason: str,
) -> None:
    push_disk(registry, tmp_path, "vms/bad:v1", files, members=members)
    status = make(
        runner,
        disk,
        "bad",
        registry.url("vms/bad:v1"),
        oci_class(runner.store, registry),
    )
    assert (status.phase, status.conditions[-1].reason) == ("Failed", reason), status.conditions
    state = runner.settings.state_dir
    assert not any(p.name == "escape" for p in tmp_path.rglob("*"))
    cache = runner.engine.cache
    assert not list(cache.root.glob("sha256-*")) and not list(cache.tmp_dir.iterdir())
    assert not list((state / "disks").rglob("disk"))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_compressed_layer_and_a_decompression_bomb(
    runner: LocalRunner,
    disk: Manifest,
    registry: Registry,
    qcow2: Path,
    tmp_path: Path,
    compression: str,
) -> None:
    klass = oci_class(runner.store, registry)
    files = {"disk/a.qcow2": qcow2.read_bytes()}
    push_disk(registry, tmp_path, "vms/gz:v1", files, compress=compression)
    served = manifest_of(registry, "vms/gz:v1")["layers"][0]["mediaType"]
    assert served.endswith(f"+{compression}")  # skopeo kept it as built
    status = make(runner, disk, "gz", registry.url("vms/gz:v1"), klass)
    assert status.phase == "Ready", status.conditions
    assert status.path is not None and same_content(Path(status.path), qcow2)
    # 256 MiB of zeros beside the disk file: a few hundred KiB compressed.
    bomb = {"disk/a.qcow2": qcow2.read_bytes(), "junk": bytes(256 * MiB)}
    push_disk(registry, tmp_path, "vms/bomb:v1", bomb, compress=compression)
    obj = disk(
        "bomb",
        "qcow2",
        source={"image": {"url": registry.url("vms/bomb:v1")}},
        className=klass,
        size="16Mi",
    )
    done = runner.reconcile(runner.store.apply(obj))
    assert isinstance(done, VMDisk) and done.status is not None
    assert (done.status.phase, done.status.conditions[-1].reason) == ("Failed", "ImageTooLarge")
    assert "decompression bomb" in done.status.conditions[-1].message
    assert not list(runner.engine.cache.tmp_dir.glob("layer-*"))


def test_ten_disks_of_one_digest_pull_once(
    runner: LocalRunner, disk: Manifest, registry: Registry, qcow2: Path, tmp_path: Path
) -> None:
    digest = push_disk(registry, tmp_path, "vms/ten:v1", {"disk/a.qcow2": qcow2.read_bytes()})
    layout = OciLayout(tmp_path / "again")  # the same image under a second tag
    layout.tag("t", layout.image(layer_tar({"disk/a.qcow2": qcow2.read_bytes()}), arch=ARCH))
    registry.push(layout, "t", "vms/ten:v2")
    klass = oci_class(runner.store, registry)
    urls = [registry.url(u) for u in ("vms/ten:v1", "vms/ten:v2", f"vms/ten@{digest}")]
    results: dict[int, VMDiskStatus] = {}

    def one(i: int) -> None:
        results[i] = make(runner, disk, f"d{i}", urls[i % 3], klass)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s.phase for s in results.values()] == ["Ready"] * 10, results
    assert len({s.base_image for s in results.values()}) == 1
    (layer,) = runner.engine.cache.root.glob("layers/layer-*")
    digest = "sha256:" + layer.name.removeprefix("layer-")
    assert registry.blob_gets(digest) == 1  # one pull
    assert registry.blob_gets(digest, "206") == 9  # each cache hit asked for one byte


def test_class_policy_applies_to_the_registry_and_every_redirect_hop(
    runner: LocalRunner, disk: Manifest, qcow2: Path, tmp_path: Path
) -> None:
    """A front on 127.0.0.1 serves the manifest and redirects blob GETs to the registry."""
    with Registry(tmp_path / "registry", address="127.0.0.2") as registry, ImageServer() as front:
        digest = push_disk(registry, tmp_path, "vms/r:v1", {"disk/a.qcow2": qcow2.read_bytes()})
        raw = subprocess.run(
            [
                "skopeo",
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{registry.host}/vms/r:v1",
            ],
            capture_output=True,
            check=True,
        ).stdout
        layer = json.loads(raw)["layers"][0]["digest"]
        front.add("/v2/vms/r/manifests/v1", raw)
        blob = f"/v2/vms/r/blobs/{layer}"
        front.redirects[blob] = f"http://{registry.host}{blob}"
        front_host = f"127.0.0.1:{front.port}"
        url = f"oci://{front_host}/vms/r:v1"
        loopback = {"plainHttpRegistries": [front_host, registry.host]}
        elsewhere = oci_class(
            runner.store, registry, "elsewhere", allowedHosts=["10.0.0.0/8"], **loopback
        )
        status = make(runner, disk, "elsewhere", url, elsewhere)
        assert (status.phase, status.conditions[-1].reason) == ("Failed", "SourceNotAllowed")
        assert "127.0.0.1" in status.conditions[-1].message
        one_hop = oci_class(
            runner.store, registry, "one-hop", allowedHosts=["127.0.0.1/32"], **loopback
        )
        status = make(runner, disk, "one-hop", url, one_hop)
        assert (status.phase, status.conditions[-1].reason) == ("Failed", "SourceNotAllowed")
        assert "127.0.0.2" in status.conditions[-1].message
        both = ["127.0.0.1/32", "127.0.0.2/32"]
        status = make(
            runner,
            disk,
            "both",
            url,
            oci_class(runner.store, registry, "both", allowedHosts=both, **loopback),
        )
        assert status.phase == "Ready", status.conditions
        assert status.image_digest == digest
        assert registry.blob_gets(layer) == 1


def test_the_agent_pulls_with_the_class_pull_secret(
    kube: Kube, agents: Callable[..., Agent], qcow2: Path, private: tuple[Registry, TokenServer]
) -> None:
    """Cluster mode: the Secret comes through the API (ApiSecrets) with the chart's RBAC."""
    registry, tokens = private
    config = {"auths": {registry.host: {"auth": base64.b64encode(b"puller:secret").decode()}}}
    secret = f"pull-{kube.namespace}"
    kube.request(
        "POST",
        kube.path("secrets", namespace=AGENT_NAMESPACE),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret, "namespace": AGENT_NAMESPACE},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
        },
    )
    try:
        sources = {
            "allowedHosts": ["127.0.0.1/32"],
            "plainHttpRegistries": [registry.host],
            "registryCredentialsRef": {"name": secret},
        }
        kube.create(
            {
                "apiVersion": "vmdisk.io/v1alpha1",
                "kind": "VMDiskClass",
                "metadata": {"name": secret},
                "spec": {"backend": "qcow2", "imageSources": sources},
            }
        )
        agents("node-a")
        url = registry.url("private/disk:v1")
        kube.create(vmdisk("pulled", className=secret, size="32Mi", source={"image": {"url": url}}))
        ready = kube.wait_for("vmdisks", "pulled", phase("Ready"), timeout=90)
        assert ready is not None
        status = ready["status"]
        assert status["imageDigest"] == registry.digest("private/disk:v1", "puller:secret")
        assert status["baseImage"].startswith("sha256-")
        assert "puller" in tokens.issued
    finally:
        kube.request("DELETE", kube.path("secrets", secret, namespace=AGENT_NAMESPACE))


@pytest.fixture
def noisy(tmp_path: Path) -> Path:
    """A 4 MiB raw image with 3 MiB of random bytes: its layer stays ~3 MiB gzip'd."""
    path = raw_image(tmp_path, "noisy", b"")
    with open(path, "r+b") as handle:
        handle.seek(MiB)
        handle.write(random.Random(17).randbytes(3 * MiB))
    return path


@pytest.fixture
def front_of(tmp_path: Path, noisy: Path) -> Iterator[tuple[ImageServer, str, str]]:
    """An image pushed to the real registry, served again: the manifest by a front that
    redirects blob GETs to a second server with switches (as registries redirect to stores).

    Yields the blob server, the oci:// URL through the front, and the blob's path.
    """
    with (
        Registry(tmp_path / "registry") as registry,
        ImageServer() as front,
        ImageServer() as blobs,
    ):
        push_disk(registry, tmp_path, "vms/f:v1", {"disk/a.raw": noisy.read_bytes()})
        raw = subprocess.run(
            [
                "skopeo",
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{registry.host}/vms/f:v1",
            ],
            capture_output=True,
            check=True,
        ).stdout
        layer = json.loads(raw)["layers"][0]["digest"]
        hex_ = layer.removeprefix("sha256:")
        stored = registry.root / "data/docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"
        front.add("/v2/vms/f/manifests/v1", raw)
        blob = f"/v2/vms/f/blobs/{layer}"
        front.redirects[blob] = blobs.add(blob, stored.read_bytes())
        yield blobs, f"oci://127.0.0.1:{front.port}/vms/f:v1", blob


def front_class(runner: LocalRunner, url: str) -> str:
    spec = {
        "backend": "qcow2",
        "imageSources": {
            "allowedHosts": ["127.0.0.1/32"],
            "plainHttpRegistries": [url.split("/")[2]],
        },
    }
    runner.store.apply(VMDiskClass.model_validate({"metadata": {"name": "front"}, "spec": spec}))
    return "front"


def test_a_dropped_layer_download_continues_where_it_stopped(
    runner: LocalRunner, disk: Manifest, front_of: tuple[ImageServer, str, str], noisy: Path
) -> None:
    blobs, url, blob = front_of
    blobs.switches.drop_once_after = 300_000  # layer bytes (whole 64 KiB chunks), then a close
    status = make(runner, disk, "resumed", url, front_class(runner, url))
    assert status.phase == "Ready", status.conditions
    assert status.path is not None and same_content(Path(status.path), noisy)
    # The second GET continues at the compressed offset; the unpacking never restarted.
    assert [s.range for s in blobs.gets(blob)] == [None, "bytes=327680-"]


def test_a_layer_that_is_not_its_digest_is_refused_and_leaves_nothing(
    runner: LocalRunner, disk: Manifest, front_of: tuple[ImageServer, str, str]
) -> None:
    blobs, url, _ = front_of
    blobs.switches.wrong_bytes = True  # the last byte flipped: the gzip trailer, past the tar
    status = make(runner, disk, "tampered", url, front_class(runner, url))
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "ChecksumMismatch")
    cache = runner.engine.cache
    assert not list(cache.root.glob("sha256-*")) and not list(cache.tmp_dir.iterdir())


def test_a_manifest_that_is_not_its_digest_is_refused(runner: LocalRunner, disk: Manifest) -> None:
    with ImageServer() as front:
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}
        claimed = "sha256:" + "ab" * 32
        front.add(f"/v2/vms/x/manifests/{claimed}", json.dumps(manifest).encode())
        url = f"oci://127.0.0.1:{front.port}/vms/x@{claimed}"
        status = make(runner, disk, "lying", url, front_class(runner, url))
        assert (status.phase, status.conditions[-1].reason) == ("Failed", "ChecksumMismatch")
        assert claimed in status.conditions[-1].message


def test_a_cached_layer_serves_only_a_repository_that_holds_it(
    runner: LocalRunner, disk: Manifest, registry: Registry, qcow2: Path, tmp_path: Path
) -> None:
    """The cache is shared by content; a manifest that merely names a cached layer gets nothing."""
    push_disk(registry, tmp_path, "vms/private:v1", {"disk/a.qcow2": qcow2.read_bytes()})
    first = make(
        runner, disk, "first", registry.url("vms/private:v1"), oci_class(runner.store, registry)
    )
    assert first.phase == "Ready", first.conditions
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{registry.host}/vms/private:v1",
        ],
        capture_output=True,
        check=True,
    ).stdout
    with ImageServer() as front:  # serves the manifest, not the layer (404)
        front.add("/v2/vms/copycat/manifests/v1", raw)
        url = f"oci://127.0.0.1:{front.port}/vms/copycat:v1"
        status = make(runner, disk, "copycat", url, front_class(runner, url))
        assert status.phase != "Ready"
        assert status.conditions[-1].reason == "DownloadFailed"
        assert "does not serve layer" in status.conditions[-1].message
        layer = json.loads(raw)["layers"][0]["digest"]
        assert [s.status for s in front.gets(f"/v2/vms/copycat/blobs/{layer}")] == [404]


def test_registries_are_reached_over_verified_tls_unless_the_class_says_plain_http(
    runner: LocalRunner,
    disk: Manifest,
    qcow2: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry serves https with a generated certificate; trusted through SSL_CERT_FILE."""
    cert = tls_certificate(tmp_path, "127.0.0.1")
    with Registry(tmp_path / "registry", tls=cert) as registry:
        push_disk(registry, tmp_path, "vms/tls:v1", {"disk/a.qcow2": qcow2.read_bytes()})
        url = registry.url("vms/tls:v1")
        tls = oci_class(runner.store, registry, "tls", plainHttpRegistries=[])
        untrusted = make(runner, disk, "untrusted", url, tls)
        assert untrusted.conditions[-1].reason == "DownloadFailed", untrusted.conditions
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.conditions[-1].message
        plain = make(runner, disk, "plain", url, oci_class(runner.store, registry, "plain"))
        assert plain.phase != "Ready"  # http:// to an https registry: no image
        monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
        trusted = make(runner, disk, "trusted", url, tls)
        assert trusted.phase == "Ready", trusted.conditions
        assert trusted.path is not None and same_content(Path(trusted.path), qcow2)


def test_http_basic_auth_with_the_class_credentials(
    runner: LocalRunner, disk: Manifest, qcow2: Path, tmp_path: Path, settings: Settings
) -> None:
    """The registry's own htpasswd auth: a Basic challenge, answered with the Secret's login."""
    with Registry(tmp_path / "registry", htpasswd={"puller": "secret"}) as registry:
        layout = OciLayout(tmp_path / "layout")
        layout.tag("t", layout.image(layer_tar({"disk/a.qcow2": qcow2.read_bytes()}), arch=ARCH))
        registry.push(layout, "t", "basic/disk:v1", creds="puller:secret")
        url = registry.url("basic/disk:v1")
        anonymous = make(runner, disk, "anon", url, oci_class(runner.store, registry, "anon"))
        assert anonymous.conditions[-1].reason == "RegistryAuthFailed"
        assert "needs credentials" in anonymous.conditions[-1].message
        secret = settings.state_dir / "secrets" / settings.namespace / "basic"
        secret.mkdir(parents=True)
        pair = base64.b64encode(b"puller:secret").decode()
        (secret / ".dockerconfigjson").write_text(
            json.dumps({"auths": {registry.host: {"auth": pair}}})
        )
        creds = oci_class(runner.store, registry, "creds", registryCredentialsRef={"name": "basic"})
        good = make(runner, disk, "good", url, creds)
        assert good.phase == "Ready", good.conditions
        assert good.path is not None and same_content(Path(good.path), qcow2)


def test_a_pull_reports_progress_in_status(
    runner: LocalRunner, disk: Manifest, front_of: tuple[ImageServer, str, str]
) -> None:
    blobs, url, _ = front_of
    blobs.switches.stall_once_after = 300_000  # a pause mid-layer, past the 2 s publish throttle
    blobs.switches.stall_seconds = 2.5
    obj = disk("slow", "qcow2", source={"image": {"url": url}}, className=front_class(runner, url))
    published: list[VMDiskStatus] = []
    final = runner.engine.reconcile_disk(runner.store.apply(obj), runner.store, published.append)
    assert final.phase == "Ready", final.conditions
    shown = [int(s.progress.rstrip("%")) for s in published if s.progress]
    assert any(0 < p < 100 for p in shown), shown  # the layer's bytes, while they arrive
    assert shown == sorted(shown)
