"""The state directory is root's data, but not trusted blindly: planted symlinks are
refused (or, for a partial download, replaced) and never followed; spec files are
root-only; a full filesystem ends as a condition or an error line, never a traceback.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import imagefactory as factory
from conftest import Manifest, loop_mounted_ext4
from httpserver import ImageServer
from vmdisk.api.vmdisk import VMDisk
from vmdisk.errors import UnsafePath
from vmdisk.local.runner import LocalRunner

MiB = factory.MiB
VMDISK = [sys.executable, "-m", "vmdisk.cli"]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Where a planted link points: must stay exactly as it was."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_bytes(b"untouched")
    return path


def listing(path: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p): (p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(path.rglob("*"))
    }


def ready(runner: LocalRunner, disk: VMDisk) -> tuple[str, str, str]:
    (result,) = runner.apply([disk])
    assert result.status is not None
    cond = next(c for c in result.status.conditions if c.type == "Ready")
    return result.status.phase, cond.reason, cond.message


def test_a_planted_namespace_symlink_is_refused(
    runner: LocalRunner, disk: Manifest, state_dir: Path, outside: Path
) -> None:
    before = listing(outside)
    (state_dir / "disks").mkdir(parents=True)
    (state_dir / "disks" / "vms").symlink_to(outside)
    started = time.monotonic()
    phase, reason, message = ready(runner, disk("a", "raw", source={"blank": {}}, size="4Mi"))
    assert (phase, reason) == ("Failed", "UnsafePath")
    assert "'vms' is a symbolic link" in message
    assert time.monotonic() - started < 10
    assert listing(outside) == before


def test_planted_lock_and_cache_links_are_not_followed(
    runner: LocalRunner, disk: Manifest, state_dir: Path, outside: Path, tmp_path: Path
) -> None:
    before = listing(outside)
    (state_dir / "locks").mkdir(parents=True)
    (state_dir / "locks" / "disk-vms-a.lock").symlink_to(outside / "new-file")
    phase, reason, _ = ready(runner, disk("a", "raw", source={"blank": {}}, size="4Mi"))
    assert (phase, reason) == ("Failed", "UnsafePath")
    assert listing(outside) == before

    (state_dir / "cache").mkdir(parents=True)
    (state_dir / "cache" / "tmp").symlink_to(outside)
    img = factory.raw(tmp_path / "b.raw")
    with ImageServer() as server:
        url = server.add("/b.raw", img.read_bytes())
        phase, reason, message = ready(
            runner, disk("b", "raw", source={"image": {"url": url}}, size="4Mi")
        )
    assert (phase, reason) == ("Failed", "UnsafePath"), message
    assert listing(outside) == before


def test_a_planted_partial_download_link_is_replaced_not_followed(
    runner: LocalRunner, disk: Manifest, state_dir: Path, outside: Path, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "c.raw")
    checksum = factory.checksum(img)
    tmp = state_dir / "cache" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / f"sha256-{checksum.removeprefix('sha256:')}.part").symlink_to(outside / "victim")
    before = listing(outside)
    with ImageServer() as server:
        url = server.add("/c.raw", img.read_bytes())
        source = {"image": {"url": url, "checksum": checksum}}
        phase, reason, message = ready(runner, disk("c", "raw", source=source, size="4Mi"))
    assert (phase, reason) == ("Ready", "Provisioned"), message
    assert listing(outside) == before


def test_specs_with_credentials_are_root_only(
    runner: LocalRunner, disk: Manifest, state_dir: Path, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "d.raw")
    with ImageServer() as server:
        server.add("/d.raw", img.read_bytes())
        url = server.url("/d.raw").replace("http://", "http://user:pw-s3cret@")
        phase, _, message = ready(runner, disk("d", "raw", source={"image": {"url": url}}))
    assert phase == "Ready", message
    holders = [p for p in state_dir.rglob("*") if p.is_file() and b"pw-s3cret" in p.read_bytes()]
    assert holders  # the stored object keeps its spec...
    for path in holders:  # ...readable by root only, in root-only directories
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700, path.parent
    assert all("objects" in p.parts for p in holders)  # status, cache and sidecars: redacted


@pytest.fixture
def tiny_state(tmp_path: Path) -> Iterator[Path]:
    with loop_mounted_ext4(tmp_path, 16) as mount:
        yield mount


def test_a_full_state_filesystem_is_an_error_line_or_a_condition(
    tmp_path: Path, tiny_state: Path
) -> None:
    state = tiny_state / "state"
    env = {**os.environ, "VMDISK_NODE_NAME": "n", "VMDISK_IMAGE_HOSTS": "127.0.0.1/32"}

    def apply(name: str, source: dict[str, object]) -> subprocess.CompletedProcess[str]:
        doc = {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDisk",
            "metadata": {"name": name},
            "spec": {"backend": "raw", "size": "12Mi", "source": source},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        started = time.monotonic()
        result = subprocess.run(
            [*VMDISK, "apply", "-f", str(path), "--state-dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert time.monotonic() - started < 60
        assert "Traceback" not in result.stderr, result.stderr
        return result

    ballast = tiny_state / "ballast"
    ballast.write_bytes(b"\1" * (8 * MiB))
    with ImageServer() as server:
        url = server.add("/e.raw", os.urandom(12 * MiB))  # no holes to save space with
        # The object fits, the 12 MiB of image bytes do not: the fetch fails as a condition.
        fetch = apply("fetch", {"image": {"url": url}})
    assert fetch.returncode == 1
    assert "VMDisk/fetch: InsufficientSpace" in fetch.stderr
    assert list((state / "cache" / "tmp").glob("*.part")) == []

    # Now not even the object file fits: one error line.
    fd = os.open(tiny_state / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    for chunk in (MiB, 4096):
        try:
            while True:
                os.write(fd, b"\1" * chunk)
        except OSError:
            pass
    os.fsync(fd)
    os.close(fd)
    full = apply("blank", {"blank": {}})
    assert full.returncode == 1
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("InsufficientSpace" in line for line in errors), full.stderr


def test_deleting_through_a_planted_namespace_link_removes_nothing_outside(
    runner: LocalRunner, disk: Manifest, state_dir: Path, outside: Path
) -> None:
    phase, *_ = ready(runner, disk("a", "raw", source={"blank": {}}, size="4Mi"))
    assert phase == "Ready"
    stored = runner.store.get_disk("vms", "a")
    assert stored is not None
    (outside / "a").mkdir()
    (outside / "a" / "precious").write_bytes(b"keep me")
    before = listing(outside)
    real = state_dir / "disks" / "vms"
    real.rename(state_dir / "disks" / "vms-moved")
    real.symlink_to(outside)
    with pytest.raises(UnsafePath, match="'vms' is a symbolic link"):
        runner.delete([stored])
    assert listing(outside) == before
