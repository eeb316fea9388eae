"""Crashes, concurrency and a full filesystem, with the real engine processes.

Each scenario ends with the same question: did anything get lost or left
behind?  (Everything runs for real: `vmdisk apply` processes killed with
SIGKILL, a real HTTP server, a real loop-mounted filesystem.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import MiB, loop_mounted_ext4
from httpserver import ImageServer
from vmdisk.host import qemu_img

BACKENDS = ("qcow2", "raw", "ploop")


def make_image(path: Path, size: int = 24 * MiB) -> str:
    """A raw image with random data in its first half; returns its checksum."""
    rng = random.Random(7)
    with open(path, "wb") as handle:
        handle.write(rng.randbytes(size // 2))
        handle.truncate(size)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write_disks(directory: Path, url: str, checksum: str, names: list[str]) -> Path:
    """Manifests for ``names``; a disk's backend depends on its name only."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDisk",
            "metadata": {"name": name, "namespace": "vms"},
            "spec": {
                "backend": BACKENDS[sum(name.encode()) % len(BACKENDS)],
                "size": "32Mi",
                "source": {"image": {"url": url, "checksum": checksum, "format": "raw"}},
            },
        }
        for name in names
    ]
    path = directory / "disks.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def apply(manifest: Path, state: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VMDISK_NODE_NAME": "node-a", "VMDISK_IMAGE_HOSTS": "127.0.0.1/32"}
    argv = [sys.executable, "-m", "vmdisk.cli", "apply", "-f", str(manifest)]
    return subprocess.Popen(
        [*argv, "--state-dir", str(state)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def delete(manifest: Path, state: Path) -> None:
    argv = [sys.executable, "-m", "vmdisk.cli", "delete", "-f", str(manifest)]
    subprocess.run([*argv, "--state-dir", str(state)], check=True)


def leftovers(state: Path) -> list[str]:
    """Temporary or half-made files anywhere in the state dir."""
    markers = (".partial", ".tmp-", ".rollback", ".grow")
    found = [
        str(p.relative_to(state)) for p in state.rglob("*") if any(m in p.name for m in markers)
    ]
    tmp = state / "cache" / "tmp"
    if tmp.exists():
        found += [str(p.relative_to(state)) for p in tmp.iterdir()]
    return found


def check_disks(state: Path, names: list[str], image: Path) -> None:
    """Every disk exists once, is consistent, and holds the image's bytes."""
    disks = sorted(p.name for p in (state / "disks" / "vms").iterdir())
    assert disks == sorted(names)
    expected = image.read_bytes()[: 4 * MiB]
    for name in names:
        record = json.loads((state / "disks" / "vms" / name / "disk.json").read_text())
        data = (
            state
            / "disks"
            / "vms"
            / name
            / ("root.hds" if record["backend"] == "ploop" else "disk")
        )
        fmt = record["format"]
        if fmt == "qcow2":
            assert qemu_img.check(data, fmt) is None
        out = data.parent / ".verify.raw"
        qemu_img.convert(data, fmt, out, "raw")
        try:
            with open(out, "rb") as handle:
                assert handle.read(4 * MiB) == expected, name
        finally:
            out.unlink()


@pytest.fixture
def slow_server() -> Iterator[ImageServer]:
    with ImageServer() as server:
        server.switches.delay = 0.3  # downloads overlap and can be interrupted
        yield server


def _begun(proc: subprocess.Popen[bytes], state: Path, names: list[str]) -> float:
    """Wait until ``proc`` stores its first object (its work begins) or exits; the time then."""
    objects = [state / "objects" / "vmdisks" / "vms" / f"{name}.json" for name in names]
    while proc.poll() is None and not any(p.exists() for p in objects):
        time.sleep(0.002)
    return time.monotonic()


def _work_time(tmp_path: Path, url: str, checksum: str, state: Path) -> float:
    """How long 20 disks from the cached image take, from their first stored object."""
    names = [f"timed-d{i:02d}" for i in range(20)]
    manifest = write_disks(tmp_path / "timed", url, checksum, names)
    proc = apply(manifest, state)
    begun = _begun(proc, state, names)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    took = time.monotonic() - begun
    delete(manifest, state)
    return took


@pytest.mark.slow
def test_kill_9_during_provisioning_loses_nothing(tmp_path: Path, slow_server: ImageServer):
    """10 rounds: 20 disks, SIGKILL at a random moment of their work, restart; check; delete.

    The first round is killed while the image downloads (0.3 s per response);
    the others within half the time 20 disks from the cached image took here.
    """
    image = tmp_path / "image.raw"
    checksum = make_image(image)
    url = slow_server.add("/image.raw", image.read_bytes())
    state = tmp_path / "state"
    rng = random.Random(1234)
    kills = 0
    window = 0.8
    for round_ in range(10):
        names = [f"r{round_}-d{i:02d}" for i in range(20)]
        manifest = write_disks(tmp_path / f"m{round_}", url, checksum, names)
        proc = apply(manifest, state)
        begun = _begun(proc, state, names)
        time.sleep(max(0.0, begun + rng.uniform(0.0, window) - time.monotonic()))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        final = apply(manifest, state)
        _, stderr = final.communicate(timeout=300)
        assert final.returncode == 0, stderr.decode()
        digest = checksum.replace(":", "-")
        cache = sorted(p.name for p in (state / "cache").glob("sha256-*"))
        assert cache == [digest, f"{digest}.json"]  # exactly one verified copy
        assert leftovers(state) == []
        check_disks(state, names, image)
        delete(manifest, state)
        if round_ == 0:
            window = 0.5 * _work_time(tmp_path, url, checksum, state)  # load varies
    assert kills >= 8, f"{kills} kills in a {window:.2f} s window"  # it really interrupted work
    digest = checksum.replace(":", "-")
    assert hashlib.sha256((state / "cache" / digest).read_bytes()).hexdigest() == checksum[7:]


@pytest.mark.slow
def test_two_processes_on_one_state_dir(tmp_path: Path, slow_server: ImageServer):
    image = tmp_path / "image.raw"
    checksum = make_image(image)
    url = slow_server.add("/image.raw", image.read_bytes())
    names = [f"d{i:02d}" for i in range(12)]
    first = write_disks(tmp_path / "a", url, checksum, names[:8])
    second = write_disks(tmp_path / "b", url, checksum, names[4:])  # 4 disks in both
    state = tmp_path / "state"
    procs = [apply(first, state), apply(second, state)]
    results = [(proc.communicate(timeout=300)[1], proc.returncode) for proc in procs]
    for stderr, returncode in results:
        assert returncode == 0, stderr.decode()
    assert [s.status for s in slow_server.gets("/image.raw")] == [200]  # one download
    assert leftovers(state) == []
    check_disks(state, names, image)


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB filesystem for a state dir that fills up."""
    with loop_mounted_ext4(tmp_path, 64) as mount:
        yield mount


def test_full_filesystem_fails_cleanly_and_recovers(
    tmp_path: Path, small_state: Path, image_dir: Path
):
    big = tmp_path / "big.raw"
    checksum = make_image(big, 48 * MiB)  # 24 MiB of data
    images = tmp_path / "imgs"
    images.mkdir()
    os.replace(big, images / "big.raw")
    state = small_state / "state"
    url = (images / "big.raw").as_uri()

    def manifest(name: str, backend: str) -> Path:
        doc = {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDisk",
            "metadata": {"name": name},
            "spec": {
                "backend": backend,
                "size": "48Mi",
                "source": {"image": {"url": url, "checksum": checksum}},
            },
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    env = {**os.environ, "VMDISK_NODE_NAME": "n", "VMDISK_IMAGE_DIRS": str(images)}

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "vmdisk.cli", "apply", "-f", str(path)]
        return subprocess.run(
            [*argv, "--state-dir", str(state)], env=env, capture_output=True, text=True
        )

    # The cached image (24 MiB) and an overlay fit; a second full raw copy does not.
    assert run(manifest("overlay", "qcow2")).returncode == 0
    ballast = small_state / "ballast"
    ballast.write_bytes(b"\1" * (20 * MiB))
    failed = run(manifest("copy", "raw"))
    assert failed.returncode == 1
    assert "InsufficientSpace" in failed.stderr
    assert leftovers(state) == []
    assert not (state / "disks" / "default" / "copy").exists()
    assert run(manifest("overlay", "qcow2")).returncode == 0  # the others are unaffected

    ballast.unlink()
    assert run(manifest("copy", "raw")).returncode == 0
    assert leftovers(state) == []
