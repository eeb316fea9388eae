"""The ``vmdisk`` command end to end, as a separate process on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import sha256_of

VMDISK = [sys.executable, "-m", "vmdisk.cli"]


def cli_env(image_dir: Path | None = None) -> dict[str, str]:
    """The environment every ``vmdisk`` command of these tests runs in."""
    env = {**os.environ, "VMDISK_NODE_NAME": "node-a", "VMDISK_IMAGE_HOSTS": "127.0.0.1/32"}
    if image_dir is not None:
        env["VMDISK_IMAGE_DIRS"] = str(image_dir)
    return env


def vmdisk(
    *args: str, state: Path, image_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = cli_env(image_dir)
    return subprocess.run(
        [*VMDISK, *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def write_manifests(path: Path, *docs: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def vmdisk_doc(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture
def manifests(tmp_path: Path, image_dir: Path) -> Path:
    image = image_dir / "base.qcow2"
    return write_manifests(
        tmp_path / "disks.yaml",
        vmdisk_doc(
            "root",
            backend="qcow2",
            size="64Mi",
            source={"image": {"url": f"file://{image}", "checksum": sha256_of(image)}},
        ),
        vmdisk_doc("scratch", backend="raw", size="8Mi", source={"blank": {}}),
    )


def test_apply_get_and_delete(tmp_path: Path, image_dir: Path, manifests: Path):
    state = tmp_path / "state"
    result = vmdisk("apply", "-f", str(manifests), state=state, image_dir=image_dir)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "BACKEND", "SIZE", "PHASE", "PATH"]
    assert [r.split()[:4] for r in rows] == [
        ["root", "qcow2", "64Mi", "Ready"],
        ["scratch", "raw", "8Mi", "Ready"],
    ]

    got = vmdisk("get", "vmdisk", "root", "-o", "json", state=state)
    obj = json.loads(got.stdout)
    assert obj["status"]["phase"] == "Ready"
    assert obj["status"]["libvirtXML"].startswith("<disk")
    assert obj["status"]["baseImage"].startswith("sha256-")

    listing = vmdisk("cache", "list", state=state)
    assert "yes" in listing.stdout.splitlines()[1]  # the qcow2 overlay uses it
    pruned = vmdisk("cache", "prune", "--max-age", "0s", state=state)
    assert pruned.stdout == ""  # in use: kept

    deleted = vmdisk("delete", "-f", str(manifests), state=state)
    assert deleted.returncode == 0, deleted.stderr
    assert not list((state / "disks").glob("*/*/disk"))
    assert vmdisk("get", state=state).stdout.strip() == "No resources found."
    pruned = vmdisk("cache", "prune", "--max-age", "0s", state=state)
    assert pruned.stdout.startswith("removed sha256-")


def test_bad_manifest_names_every_field_and_writes_nothing(tmp_path: Path):
    bad = write_manifests(
        tmp_path / "bad.yaml",
        vmdisk_doc("../x", size="10Gx", source={"blank": {}, "disk": {"name": "a"}}),
        vmdisk_doc("ok", size="1Gi", source={"blank": {}}, libvirt={"bux": "virtio"}),
    )
    state = tmp_path / "state"
    result = vmdisk("apply", "-f", str(bad), state=state)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for field in ("metadata.name", "spec.size", "spec.source", "spec.libvirt.bux"):
        assert field in result.stderr
    assert not state.exists()


def test_a_directory_of_manifests_reports_every_problem_in_file_order(tmp_path: Path):
    """A bad field, unreadable YAML, another bad field: one line each, file by file."""
    folder = tmp_path / "manifests"
    folder.mkdir()
    write_manifests(folder / "a.yaml", vmdisk_doc("a", size="10Gx", source={"blank": {}}))
    (folder / "b.yaml").write_text("kind: [unclosed\n")
    write_manifests(folder / "c.yaml", vmdisk_doc("c", size="1Gi", source={"blank": {}}, x=1))
    result = vmdisk("apply", "-f", str(folder), state=tmp_path / "state")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    order = [next(i for i, line in enumerate(lines) if f"{name}.yaml" in line) for name in "abc"]
    assert order == sorted(order), result.stderr
    assert "spec.size" in lines[order[0]] and "invalid YAML" in lines[order[1]]
    assert "spec.x" in lines[order[2]]


def test_exit_code_and_reason_when_not_ready(tmp_path: Path, image_dir: Path):
    image = image_dir / "base.qcow2"
    wrong = "sha256:" + "0" * 64
    manifest = write_manifests(
        tmp_path / "m.yaml",
        vmdisk_doc(
            "bad", size="64Mi", source={"image": {"url": f"file://{image}", "checksum": wrong}}
        ),
    )
    result = vmdisk("apply", "-f", str(manifest), state=tmp_path / "state", image_dir=image_dir)
    assert result.returncode == 1
    assert result.stderr.count("ChecksumMismatch") == 1, result.stderr  # printed once
    assert "Failed" in result.stdout


def test_file_outside_image_dirs_is_refused(tmp_path: Path, image_dir: Path):
    outside = tmp_path / "elsewhere.raw"
    outside.write_bytes(b"\0" * 4096)
    manifest = write_manifests(
        tmp_path / "m.yaml", vmdisk_doc("x", source={"image": {"url": f"file://{outside}"}})
    )
    result = vmdisk("apply", "-f", str(manifest), state=tmp_path / "state", image_dir=image_dir)
    assert result.returncode == 1
    assert "SourceNotAllowed" in result.stderr


def test_delete_refused_while_snapshots_depend(tmp_path: Path):
    state = tmp_path / "state"
    manifest = write_manifests(
        tmp_path / "m.yaml",
        vmdisk_doc("d", backend="qcow2", size="8Mi", source={"blank": {}}),
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "s"},
            "spec": {"diskName": "d"},
        },
    )
    assert vmdisk("apply", "-f", str(manifest), state=state).returncode == 0
    refused = vmdisk("delete", "vmdisk", "d", state=state)
    assert refused.returncode == 1
    assert "HasDependents" in refused.stderr and "DiskSnapshot/s" in refused.stderr
    assert (state / "disks" / "default" / "d" / "disk").exists()
    assert vmdisk("delete", "-f", str(manifest), state=state).returncode == 0
    assert not (state / "disks" / "default" / "d").exists()


def test_nothing_is_written_outside_the_state_dir(tmp_path: Path, image_dir: Path, manifests: Path):
    state = tmp_path / "state"
    before = set(tmp_path.rglob("*")) | set(image_dir.rglob("*"))
    vmdisk("apply", "-f", str(manifests), state=state, image_dir=image_dir)
    after = set(tmp_path.rglob("*")) | set(image_dir.rglob("*"))
    assert {p for p in after - before if not p.is_relative_to(state)} == set()


def test_crds_command_prints_all(tmp_path: Path):
    result = vmdisk("crds", state=tmp_path)  # --state-dir is not a crds flag
    assert result.returncode == 2
    result = subprocess.run([*VMDISK, "crds"], capture_output=True, text=True, check=True)
    kinds = [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["VMDiskClass", "VMDisk", "DiskSnapshot"]
