"""Shared fixtures: a state directory, test images made with real qemu-img, the engine."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from httpserver import ImageServer
from vmdisk.api.vmdisk import VMDisk
from vmdisk.config import Settings
from vmdisk.engine.reconcile import Engine
from vmdisk.layout import StateLayout
from vmdisk.local.runner import LocalRunner
from vmdisk.local.store import LocalStore

pytest_plugins = ["libvirtd", "apiserver", "agents", "lvmfixtures", "ceph", "testvm"]

MiB = 1024 * 1024
# A recognisable pattern at known offsets, so tests can prove data survived.
PATTERN = {0: b"vmdisk-boot-sector", 5 * MiB: b"middle-of-the-image", 15 * MiB + 7: b"tail"}


def rbd_class(store: LocalStore, image_dir: Path, pool: str, name: str = "rbd") -> None:
    """An administrator's rbd class in the local store: ``pool``, file images from ``image_dir``.

    Disks that name ``backend: rbd`` and no class get it (the class named like the backend).
    """
    from vmdisk.api.vmdiskclass import VMDiskClass

    spec = {
        "backend": "rbd",
        "parameters": {"pool": pool},
        "imageSources": {"fileDirs": [str(image_dir)]},
    }
    store.apply(VMDiskClass.model_validate({"metadata": {"name": name}, "spec": spec}))


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def qemu_read(path: Path, fmt: str, offset: int, length: int, snapshot: str | None = None) -> bytes:
    """Read guest-visible bytes through qemu-img (so qcow2 overlays read their base)."""
    out = path.parent / f".read-{offset}.raw"
    argv = ["qemu-img", "convert", "-f", fmt, "-O", "raw"]
    if snapshot:
        argv += ["-l", f"snapshot.name={snapshot}"]
    subprocess.run([*argv, str(path), str(out)], check=True)
    try:
        return read_at(out, offset, length)
    finally:
        out.unlink()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    """An image server on loopback for one test (tests/httpserver.py)."""
    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of images: a 16 MiB raw with PATTERN and its qcow2 conversion."""
    root = tmp_path_factory.mktemp("images")
    raw = root / "base.raw"
    with open(raw, "wb") as handle:
        handle.truncate(16 * MiB)
        for offset, data in PATTERN.items():
            handle.seek(offset)
            handle.write(data)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(root / "base.qcow2")],
        check=True,
    )
    return root


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def settings(state_dir: Path, image_dir: Path) -> Settings:
    # The tests' image servers listen on loopback, which only an explicit CIDR allows.
    return Settings(
        state_dir=state_dir,
        node_name="node-a",
        image_dirs=(image_dir,),
        image_hosts=("127.0.0.1/32",),
    )


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return Engine.build(settings)


@pytest.fixture
def store(settings: Settings) -> LocalStore:
    return LocalStore(StateLayout(settings.state_dir))


@pytest.fixture
def runner(settings: Settings, engine: Engine, store: LocalStore) -> LocalRunner:
    return LocalRunner(settings, engine, store)


Manifest = Callable[..., VMDisk]


@pytest.fixture
def disk() -> Manifest:
    """Build a VMDisk model: ``disk("a", "qcow2", source={...}, size="32Mi")``."""

    def make(name: str, backend: str, *, source: dict[str, Any], **spec: Any) -> VMDisk:
        return VMDisk.model_validate(
            {
                "apiVersion": "vmdisk.io/v1alpha1",
                "kind": "VMDisk",
                "metadata": {"name": name, "namespace": "vms"},
                "spec": {"backend": backend, "source": source, **spec},
            }
        )

    return make


@contextmanager
def loop_mounted_ext4(directory: Path, size_mib: int) -> Iterator[Path]:
    """A small ext4 filesystem, loop-mounted under ``directory``, to fill up for real."""
    image = directory / f"fs-{size_mib}.img"
    mount = directory / f"mnt-{size_mib}"
    mount.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image), f"{size_mib}M"], check=True)
    result = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"loop mounts are not available here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
