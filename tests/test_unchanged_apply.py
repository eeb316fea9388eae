"""A re-apply of the documents last applied, to unchanged disks, is answered from the
files alone (``settled.unchanged_batch``): no model is built, nothing is written,
and the output is the full apply's.  Anything the record beside an object does
not vouch for takes the full apply, which decides and reports as before.

Real ``vmdisk`` processes on real files and real qemu-img.  "No model was built"
is observed with ``python -X importtime``: the command never imported pydantic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from test_cli import cli_env, vmdisk_doc, write_manifests

MiB = 1024 * 1024


class Applied:
    """One ``vmdisk apply``: its exit code, output, and whether it built models."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code, self.stdout = proc.returncode, proc.stdout
        timed = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
        self.models = "pydantic" in (line.split("|")[-1].strip() for line in timed)
        self.errors = [line for line in proc.stderr.splitlines() if line not in timed]


def apply(manifest: Path, state: Path, *extra: str) -> Applied:
    argv = [sys.executable, "-X", "importtime", "-m", "vmdisk.cli", "apply", "-f", str(manifest)]
    env = cli_env()
    proc = subprocess.run(
        [*argv, "--state-dir", str(state), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return Applied(proc)


def stored(state: Path, name: str, namespace: str = "default") -> Path:
    return state / "objects" / "vmdisks" / namespace / f"{name}.json"


def _disks() -> list[dict[str, object]]:
    return [
        vmdisk_doc("q", backend="qcow2", size="32Mi", source={"blank": {}}),
        vmdisk_doc("r", backend="raw", size="4Mi", source={"blank": {}}),
    ]


@pytest.fixture
def applied(tmp_path: Path) -> tuple[Path, Path, Applied]:
    """Two disks applied once (the full apply, models and all): manifest, state, result."""
    manifest = write_manifests(tmp_path / "disks.yaml", *_disks())
    state = tmp_path / "state"
    first = apply(manifest, state)
    assert first.code == 0, first.errors
    assert first.models
    return manifest, state, first


def test_a_re_apply_of_the_same_documents_builds_no_model_and_prints_the_same(
    applied: tuple[Path, Path, Applied],
):
    manifest, state, first = applied
    before = {p: p.stat().st_mtime_ns for p in (stored(state, "q"), stored(state, "r"))}
    for _ in range(2):
        again = apply(manifest, state)
        assert (again.code, again.errors, again.models) == (0, [], False)
        assert again.stdout == first.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_the_same_documents_under_apply_n_are_known_too(tmp_path: Path):
    manifest = write_manifests(tmp_path / "disks.yaml", *_disks())
    state = tmp_path / "state"
    first = apply(manifest, state, "-n", "vms")
    assert first.code == 0, first.errors
    again = apply(manifest, state, "-n", "vms")
    assert (again.code, again.models, again.stdout) == (0, False, first.stdout)
    elsewhere = apply(manifest, state)  # the default namespace holds none of them
    assert elsewhere.code == 0 and elsewhere.models
    assert stored(state, "q").exists() and stored(state, "q", "vms").exists()


def _rewrite_stored(state: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = stored(state, "q")
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_stored(state: Path) -> None:  # by hand, behind the store's back
    _rewrite_stored(state, lambda data: data["spec"].update(size="16Mi"))


def _write_to_disk(state: Path) -> None:
    with (state / "disks" / "default" / "r" / "disk").open("r+b") as handle:
        handle.write(os.urandom(MiB))  # what a guest does: data where there was a hole


def _forget_record(state: Path) -> None:  # as an older vmdisk stored it
    _rewrite_stored(state, lambda data: data.pop("hostApplied"))


def _lose_status(state: Path) -> None:  # as a kill before the first reconcile leaves it
    _rewrite_stored(state, lambda data: [data.pop("status"), data.pop("hostFingerprint")])


@pytest.mark.parametrize(
    "change",
    [_edit_stored, _write_to_disk, _forget_record, _lose_status],
    ids=["stored-object-edited", "disk-written", "no-record", "never-reconciled"],
)
def test_what_the_record_does_not_vouch_for_takes_the_full_apply(
    applied: tuple[Path, Path, Applied], change: Callable[[Path], None]
):
    manifest, state, _ = applied
    change(state)
    again = apply(manifest, state)
    assert again.code == 0, again.errors
    assert again.models, "a changed state was answered from the record"
    data = json.loads(stored(state, "q").read_text())
    assert data["spec"]["size"] == "32Mi"  # the manifest's, whatever the file said
    settled = apply(manifest, state)  # the full apply recorded what it saw
    assert (settled.code, settled.models) == (0, False)


def test_a_changed_document_is_applied(applied: tuple[Path, Path, Applied], tmp_path: Path):
    manifest, state, _ = applied
    bigger = [vmdisk_doc("q", backend="qcow2", size="64Mi", source={"blank": {}}), _disks()[1]]
    again = apply(write_manifests(manifest, *bigger), state)
    assert again.code == 0 and again.models
    data = json.loads(stored(state, "q").read_text())
    assert (data["metadata"]["generation"], data["status"]["virtualSize"]) == (2, 64 * MiB)


def test_a_document_written_differently_is_recorded_once(applied: tuple[Path, Path, Applied]):
    """Same object, other document (a default spelt out): recorded, not reconciled."""
    manifest, state, first = applied
    spelt = [
        vmdisk_doc("q", backend="qcow2", size="32Mi", source={"blank": {}}, preallocation="none"),
        _disks()[1],
    ]
    path = stored(state, "q")
    status = json.loads(path.read_text())["status"]
    again = apply(write_manifests(manifest, *spelt), state)
    assert (again.code, again.models, again.stdout) == (0, True, first.stdout)
    data = json.loads(path.read_text())
    assert (data["metadata"]["generation"], data["status"]) == (1, status)
    quiet = apply(manifest, state)
    assert (quiet.code, quiet.models, quiet.stdout) == (0, False, first.stdout)


def test_documents_json_cannot_tell_apart_are_validated(applied: tuple[Path, Path, Applied]):
    """A label key 1 (an int) where "1" was: the same JSON, not the same document."""
    manifest, state, _ = applied
    labelled = vmdisk_doc("q", backend="qcow2", size="32Mi", source={"blank": {}})
    labelled["metadata"] = {"name": "q", "labels": {"1": "one"}}
    write_manifests(manifest, labelled)
    assert apply(manifest, state).code == 0
    assert apply(manifest, state).models is False
    manifest.write_text(manifest.read_text().replace("'1': one", "1: one"))
    refused = apply(manifest, state)
    assert refused.code == 2 and refused.models
    assert any("metadata.labels" in line for line in refused.errors), refused.errors


def test_yaml_output_takes_the_full_apply(applied: tuple[Path, Path, Applied]):
    """-o yaml prints what the models serialise, in their order."""
    manifest, state, _ = applied
    again = apply(manifest, state, "-o", "yaml")
    assert (again.code, again.models) == (0, True)
    assert again.stdout.startswith("apiVersion: vmdisk.io/v1alpha1\nkind: VMDisk\n")


def test_a_namespace_other_than_apply_n_is_refused_as_ever(tmp_path: Path):
    docs = [{**d, "metadata": {"name": "q", "namespace": "vms"}} for d in _disks()[:1]]
    manifest = write_manifests(tmp_path / "disks.yaml", *docs)
    state = tmp_path / "state"
    assert apply(manifest, state, "-n", "vms").code == 0
    assert apply(manifest, state, "-n", "vms").models is False
    refused = apply(manifest, state, "-n", "other")
    assert refused.code == 2 and refused.models
    assert any("does not match -n 'other'" in line for line in refused.errors), refused.errors
