"""Data that exists under a disk's name is adopted only when it is that backend's own.

A raw disk kept with ``deletionPolicy: Retain`` whose guest wrote a qcow2 header naming
a host file is never re-read as qcow2 by a new VMDisk of the same name (Nova bug
1221190); unowned data under the name is ``DiskExists`` naming the path; a tampered
record is ``FormatConflict``.  The data stays byte for byte as it was.  Two processes
applying conflicting backends for one name at once end with one disk and a clear reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

import imagefactory as factory
from conftest import Manifest
from httpserver import ImageServer
from vmdisk.api.vmdisk import VMDisk
from vmdisk.local.runner import LocalRunner

MiB = factory.MiB


def outcome(runner: LocalRunner, disk: VMDisk) -> tuple[str, str, str, str | None]:
    (result,) = runner.apply([disk])
    assert result.status is not None
    cond = next(c for c in result.status.conditions if c.type == "Ready")
    return result.status.phase, cond.reason, cond.message, result.status.libvirt_xml


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_a_retained_raw_disk_is_never_adopted_as_qcow2(
    runner: LocalRunner, disk: Manifest, state_dir: Path, tmp_path: Path
) -> None:
    phase, *_ = outcome(
        runner, disk("web", "raw", source={"blank": {}}, size="4Mi", deletionPolicy="Retain")
    )
    assert phase == "Ready"
    stored = runner.store.get_disk("vms", "web")
    assert stored is not None
    assert runner.delete([stored]) == []
    # The guest wrote a qcow2 header whose backing file is a host file.
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"secret" * 1000)
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(host_file), "-F", "raw", str(evil)],
        check=True,
    )
    data_dir = state_dir / "disks" / "vms" / "web"
    with open(data_dir / "disk", "r+b") as handle:
        handle.write(evil.read_bytes())
    before = digest(data_dir)

    started = time.monotonic()
    phase, reason, message, xml = outcome(
        runner, disk("web", "qcow2", source={"blank": {}}, size="4Mi")
    )
    assert (phase, reason) == ("Failed", "DiskExists")
    assert str(data_dir) in message and "raw disk, not a qcow2 one" in message
    assert xml is None or "qcow2" not in xml
    assert time.monotonic() - started < 10
    assert digest(data_dir) == before

    # Asked for with its real backend, the retained data is adopted as what it is.
    phase, _, _, xml = outcome(runner, disk("web", "raw", source={"blank": {}}, size="4Mi"))
    assert phase == "Ready" and xml is not None and "type='raw'" in xml.replace('"', "'")
    assert digest(data_dir) == before


def test_unowned_data_under_the_name_is_disk_exists(
    runner: LocalRunner, disk: Manifest, state_dir: Path
) -> None:
    data_dir = state_dir / "disks" / "vms" / "db"
    data_dir.mkdir(parents=True)
    (data_dir / "disk").write_bytes(b"someone's data")
    before = digest(data_dir)
    for _ in range(2):  # the same answer every time, no traceback, nothing half-made
        phase, reason, message, _ = outcome(
            runner, disk("db", "qcow2", source={"blank": {}}, size="4Mi")
        )
        assert (phase, reason) == ("Failed", "DiskExists")
        assert str(data_dir) in message
    assert digest(data_dir) == before
    assert sorted(p.name for p in data_dir.parent.iterdir()) == ["db"]


def test_a_record_naming_another_format_is_format_conflict(
    runner: LocalRunner, disk: Manifest, state_dir: Path
) -> None:
    phase, *_ = outcome(runner, disk("app", "raw", source={"blank": {}}, size="4Mi"))
    assert phase == "Ready"
    record = state_dir / "disks" / "vms" / "app" / "disk.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "format": "qcow2"}))
    before = digest(record.parent)
    stored = runner.store.get_disk("vms", "app")
    assert stored is not None
    status = runner.engine.verify_disk(stored)
    assert status is not None and status.conditions[-1].reason in ("FormatConflict",)
    phase, reason, _, _ = outcome(runner, disk("app", "raw", source={"blank": {}}, size="4Mi"))
    assert (phase, reason) == ("Failed", "FormatConflict")
    assert digest(record.parent) == before


def test_two_processes_racing_with_conflicting_backends(tmp_path: Path) -> None:
    img = factory.raw(tmp_path / "a.raw")
    state = tmp_path / "state"
    env = {**os.environ, "VMDISK_NODE_NAME": "n", "VMDISK_IMAGE_HOSTS": "127.0.0.1/32"}
    with ImageServer() as server:
        url = server.add("/a.raw", img.read_bytes())
        server.switches.delay = 1.0  # both processes are in flight together
        procs = []
        for backend in ("raw", "qcow2"):
            doc = {
                "apiVersion": "vmdisk.io/v1alpha1",
                "kind": "VMDisk",
                "metadata": {"name": "shared"},
                "spec": {"backend": backend, "size": "8Mi", "source": {"image": {"url": url}}},
            }
            path = tmp_path / f"{backend}.yaml"
            path.write_text(yaml.safe_dump(doc))
            argv = [sys.executable, "-m", "vmdisk.cli", "apply", "-f", str(path)]
            procs.append(
                subprocess.Popen(
                    [*argv, "--state-dir", str(state), "-o", "json"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], results
    for _, err in results:
        assert "Traceback" not in err
    loser = next(err for (_, err), p in zip(results, procs, strict=True) if p.returncode == 1)
    assert "ImmutableField" in loser or "DiskExists" in loser, loser
    winner = json.loads(
        next(out for (out, _), p in zip(results, procs, strict=True) if not p.returncode)
    )
    record = json.loads((state / "disks" / "default" / "shared" / "disk.json").read_text())
    assert record["backend"] == winner["status"]["backend"]
    assert sorted(p.name for p in (state / "disks" / "default").iterdir()) == ["shared"]


def test_a_status_of_an_older_generation_is_not_verified(
    runner: LocalRunner, disk: Manifest
) -> None:
    """What the agent's verify timer may hold: the body of the new spec with the status of
    the old one (the reconcile's own status is still on its way).  Verifying it would
    write the old status back over the new one, so it is left to the reconcile."""
    phase, *_ = outcome(runner, disk("app", "qcow2", source={"blank": {}}, size="16Mi"))
    assert phase == "Ready"
    grown = outcome(runner, disk("app", "qcow2", source={"blank": {}}, size="32Mi"))
    assert grown[0] == "Ready"
    stored = runner.store.get_disk("vms", "app")
    assert stored is not None and stored.status is not None
    assert stored.status.virtual_size == 32 * 1024 * 1024
    stale = stored.status.model_copy(
        update={"virtual_size": 16 * 1024 * 1024, "observed_generation": 1}
    )
    assert runner.engine.verify_disk(stored.model_copy(update={"status": stale})) is None
    # The same status at the current generation disagrees with the host: a new one.
    current = stale.model_copy(update={"observed_generation": stored.metadata.generation})
    fresh = runner.engine.verify_disk(stored.model_copy(update={"status": current}))
    assert fresh is not None and fresh.virtual_size == 32 * 1024 * 1024
