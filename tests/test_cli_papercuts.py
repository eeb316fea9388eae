"""What a new user meets first: the ``vmdisk`` command's output, help and flags,
run as a separate process on a real state directory with real qemu-img disks.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import sha256_of
from test_cli import cli_env, vmdisk, vmdisk_doc, write_manifests
from vmdisk.cli import _parser

SNAPSHOT = {
    "apiVersion": "vmdisk.io/v1alpha1",
    "kind": "DiskSnapshot",
    "metadata": {"name": "s"},
    "spec": {"diskName": "d"},
}


def test_mixed_kinds_get_one_table_each(tmp_path: Path):
    manifest = write_manifests(
        tmp_path / "m.yaml",
        vmdisk_doc("d", backend="qcow2", size="8Mi", source={"blank": {}}),
        SNAPSHOT,
    )
    result = vmdisk("apply", "-f", str(manifest), state=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    disks, snapshots = result.stdout.strip().split("\n\n")
    assert disks.splitlines()[0].split() == ["NAME", "BACKEND", "SIZE", "PHASE", "PATH"]
    assert disks.splitlines()[1].split()[:4] == ["d", "qcow2", "8Mi", "Ready"]
    assert snapshots.splitlines()[0].split() == ["NAME", "DISK", "READY", "PHASE", "EXPORT"]
    assert snapshots.splitlines()[1].split() == ["s", "d", "true", "Ready"]


def test_get_checks_the_host(tmp_path: Path):
    state = tmp_path / "state"
    manifest = write_manifests(
        tmp_path / "m.yaml", vmdisk_doc("d", backend="raw", size="8Mi", source={"blank": {}})
    )
    assert vmdisk("apply", "-f", str(manifest), state=state).returncode == 0
    shutil.rmtree(state / "disks" / "default" / "d")
    got = json.loads(vmdisk("get", "vmdisk", "d", "-o", "json", state=state).stdout)
    assert got["status"]["phase"] == "Failed"
    assert got["status"]["conditions"][0]["reason"] == "DiskMissing"
    listed = vmdisk("get", state=state).stdout.splitlines()[1].split()
    assert listed[:4] == ["d", "raw", "8Mi", "Failed"]


def test_every_command_and_option_has_a_description():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [name for name, p in sub.choices.items() if not p.description]
    for name, command in sub.choices.items():
        undocumented += [
            f"{name} {'/'.join(a.option_strings) or a.dest}"
            for a in command._actions
            if not a.help and not isinstance(a, argparse._HelpAction)
        ]
    assert undocumented == []
    assert [c.dest for c in sub._choices_actions] == list(sub.choices)  # one summary line each


def test_max_age_needs_a_unit(tmp_path: Path):
    result = vmdisk("cache", "prune", "--max-age", "3", state=tmp_path / "state")
    assert result.returncode == 2
    assert "give a unit" in result.stderr and "Traceback" not in result.stderr
    env_result = vmdisk("cache", "prune", "--max-age", "3s", state=tmp_path / "state")
    assert env_result.returncode == 0


def test_cache_list_says_allocated_and_has_json(tmp_path: Path, image_dir: Path):
    state = tmp_path / "state"
    image = image_dir / "base.qcow2"
    manifest = write_manifests(
        tmp_path / "m.yaml",
        vmdisk_doc(
            "d",
            backend="qcow2",
            size="64Mi",
            source={"image": {"url": f"file://{image}", "checksum": sha256_of(image)}},
        ),
    )
    assert vmdisk("apply", "-f", str(manifest), state=state, image_dir=image_dir).returncode == 0
    header = vmdisk("cache", "list", state=state).stdout.splitlines()[0].split()
    assert "ALLOCATED" in header and "VIRTUAL" in header and "SIZE" not in header
    (entry,) = json.loads(vmdisk("cache", "list", "-o", "json", state=state).stdout)["items"]
    assert entry["id"] == "sha256-" + sha256_of(image).removeprefix("sha256:")
    assert entry["in_use"] is True and entry["virtual_size"] == 16 * 1024 * 1024
    assert entry["allocated_bytes"] == Path(entry["path"]).stat().st_blocks * 512

    (state / "disks" / "other" / "stray").mkdir(parents=True)
    orphans = json.loads(vmdisk("orphans", "-o", "json", state=state).stdout)
    assert orphans == {"items": ["other/stray"]}


def test_apply_namespace_flag_places_objects_and_refuses_conflicts(tmp_path: Path):
    state = tmp_path / "state"
    manifest = write_manifests(
        tmp_path / "m.yaml", vmdisk_doc("d", backend="raw", size="1Mi", source={"blank": {}})
    )
    assert vmdisk("apply", "-n", "team", "-f", str(manifest), state=state).returncode == 0
    assert (state / "disks" / "team" / "d" / "disk").exists()
    assert vmdisk("get", "vmdisk", "d", state=state).returncode == 1  # not in default
    assert vmdisk("get", "vmdisk", "d", "-n", "team", state=state).returncode == 0

    doc = vmdisk_doc("e", backend="raw", size="1Mi", source={"blank": {}})
    doc["metadata"] = {"name": "e", "namespace": "elsewhere"}
    conflicting = write_manifests(tmp_path / "c.yaml", doc)
    refused = vmdisk("apply", "-n", "team", "-f", str(conflicting), state=state)
    assert refused.returncode == 2 and "does not match -n 'team'" in refused.stderr

    assert vmdisk("delete", "vmdisk", "d", "-n", "team", state=state).returncode == 0
    assert not (state / "disks" / "team" / "d").exists()


# What a command that has nothing to reconcile must not load (start-up is
# measured by ``make bench``; this keeps the heavy imports off its path).
HEAVY = (
    "pydantic",
    "oslo_utils",
    "libvirtmod",  # the bindings' C part: "libvirt" itself may be a lazy module
    "urllib3",
    "vmdisk.engine.reconcile",
    "vmdisk.backends",
)


def _loaded_after(
    argv: list[str], heavy: tuple[str, ...] = HEAVY, image_dir: Path | None = None
) -> list[str]:
    """The ``heavy`` modules loaded by ``vmdisk ARGV`` run in a fresh interpreter."""
    import subprocess
    import sys

    probe = textwrap.dedent(
        f"""
        import contextlib, sys
        from vmdisk import cli
        with contextlib.suppress(SystemExit):
            cli.main({argv!r})
        heavy = {heavy!r}
        print(sorted(h for h in heavy if any(m == h or m.startswith(h + ".") for m in sys.modules)))
        """
    )
    argv = [sys.executable, "-c", probe]
    env = cli_env(image_dir)
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    return list(ast.literal_eval(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["get"], ["get", "vmdiskclass"], ["get", "vmdisk", "nope"], ["cache", "list"]],
    ids=" ".join,
)
def test_commands_with_nothing_to_check_load_no_models_engine_or_images(
    tmp_path: Path, argv: list[str]
) -> None:
    state = ["--state-dir", str(tmp_path)] if argv != ["--help"] else []
    assert _loaded_after([*argv, *state]) == []


def test_get_loads_the_engine_once_a_disk_changed_behind_its_status(tmp_path: Path) -> None:
    """The probe above can fail: a Ready disk written since its status was saved is
    checked against the host by the engine; an untouched one only by a stat."""
    manifest = write_manifests(
        tmp_path / "d.yaml", vmdisk_doc("d", backend="raw", size="1Mi", source={"blank": {}})
    )
    state = tmp_path / "state"
    assert vmdisk("apply", "-f", str(manifest), state=state).returncode == 0
    untouched = set(_loaded_after(["get", "--state-dir", str(state)]))
    assert "pydantic" in untouched and "vmdisk.engine.reconcile" not in untouched

    with (state / "disks" / "default" / "d" / "disk").open("r+b") as data:
        data.write(b"\1" * 65536)  # a guest's write: the allocation no longer matches
    changed = set(_loaded_after(["get", "--state-dir", str(state)]))
    assert {"pydantic", "vmdisk.engine.reconcile", "vmdisk.backends"} <= changed
    shown = vmdisk("get", "vmdisk", "d", "-o", "json", state=state)
    assert json.loads(shown.stdout)["status"]["actualSize"] >= 65536


FETCHING = ("urllib3", "libvirtmod", "vmdisk.images.download", "vmdisk.images.registry")


def test_a_disk_from_a_cached_image_loads_no_http_registry_or_libvirt_code(
    tmp_path: Path, image_dir: Path
) -> None:
    """The first apply fetches (and loads the fetching code); the second disk of the
    same image is made from the cache, a new disk has no domain to ask libvirt
    about, and neither loads that code."""
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    state = ["--state-dir", str(tmp_path / "state")]
    for name in ("first", "second"):
        write_manifests(
            tmp_path / f"{name}.yaml", vmdisk_doc(name, backend="qcow2", size="64Mi", source=source)
        )
    first = _loaded_after(
        ["apply", "-f", str(tmp_path / "first.yaml"), *state], FETCHING, image_dir
    )
    assert "vmdisk.images.download" in first  # the probe sees a fetch when there is one
    second = _loaded_after(
        ["apply", "-f", str(tmp_path / "second.yaml"), *state], FETCHING, image_dir
    )
    assert second == []
    shown = vmdisk("get", "vmdisk", "second", "-o", "json", state=tmp_path / "state")
    assert json.loads(shown.stdout)["status"]["phase"] == "Ready"
