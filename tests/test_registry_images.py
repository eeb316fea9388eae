"""containerDisks from a real registry: oci:// (and docker://) image sources end to end.

The registry is Debian's docker-registry (CNCF distribution v2) on loopback,
anonymous or behind its own token auth (``registry.TokenServer`` signs the
JWTs it verifies); images are pushed with Debian's skopeo from OCI layouts
built here; disks are made by the real engine and compared with qemu-img.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Manifest
from registry import OciLayout, Registry, TokenServer, layer_tar
from vmdisk.api.vmdisk import VMDisk, VMDiskStatus
from vmdisk.api.vmdiskclass import VMDiskClass
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
    compress = kw.pop("compress", False)
    layout.tag(
        "t", layout.image(layer_tar(files, compress=compress, **kw), arch=ARCH, compressed=compress)
    )
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
