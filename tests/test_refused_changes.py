"""A refused change leaves a healthy disk Ready, with a separate condition saying so
(the Kubernetes convention), on real file disks and through the real ``vmdisk`` command.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Manifest, MiB
from test_backends import apply, ready_reason, status_of
from test_cli import vmdisk, vmdisk_doc, write_manifests
from vmdisk.local.runner import LocalRunner


def test_a_backend_change_is_refused_and_the_disk_stays_ready(runner: LocalRunner, disk: Manifest):
    (made,) = apply(runner, disk("pinned", "raw", source={"blank": {}}, size="4Mi"))
    (moved,) = apply(runner, disk("pinned", "qcow2", source={"blank": {}}, size="4Mi"))
    st = status_of(moved)
    assert (st.phase, ready_reason(moved), st.backend) == ("Ready", "Provisioned", "raw")
    assert st.observed_generation == 2 and st.libvirt_xml == status_of(made).libvirt_xml
    (refused,) = [c for c in st.conditions if c.type == "ChangeRefused"]
    assert (refused.reason, refused.status) == ("ImmutableField", "True")
    assert refused.message.startswith("spec.backend")
    # Putting the spec back (and growing) clears the refusal.
    (back,) = apply(runner, disk("pinned", "raw", source={"blank": {}}, size="8Mi"))
    assert status_of(back).virtual_size == 8 * MiB
    assert [c.type for c in status_of(back).conditions] == ["Ready"]


def test_apply_reports_a_refused_shrink_and_exits_non_zero(tmp_path: Path):
    state = tmp_path / "state"
    grown = write_manifests(
        tmp_path / "a.yaml", vmdisk_doc("d", backend="raw", size="8Mi", source={"blank": {}})
    )
    assert vmdisk("apply", "-f", str(grown), state=state).returncode == 0
    shrunk = write_manifests(
        tmp_path / "b.yaml", vmdisk_doc("d", backend="raw", size="4Mi", source={"blank": {}})
    )
    result = vmdisk("apply", "-f", str(shrunk), "-o", "json", state=state)
    assert result.returncode == 1
    assert "ShrinkNotSupported" in result.stderr
    status = json.loads(result.stdout)["status"]
    assert status["phase"] == "Ready" and status["virtualSize"] == 8 * MiB


def test_an_unstartable_device_edit_is_refused_and_the_disk_keeps_its_xml(
    runner: LocalRunner, disk: Manifest
):
    (made,) = apply(runner, disk("cd", "raw", source={"blank": {}}, size="4Mi"))
    bad = {"device": "cdrom", "bus": "virtio"}  # QEMU will not start it
    (edited,) = apply(runner, disk("cd", "raw", source={"blank": {}}, size="4Mi", libvirt=bad))
    st = status_of(edited)
    assert (st.phase, ready_reason(edited)) == ("Ready", "Provisioned")
    assert st.libvirt_xml == status_of(made).libvirt_xml
    (refused,) = [c for c in st.conditions if c.type == "ChangeRefused"]
    assert refused.message.startswith("spec.libvirt.bus: a cdrom cannot be on the virtio bus")
    # A new disk asking for the same is Failed before any data is made.
    (new,) = apply(runner, disk("cd2", "raw", source={"blank": {}}, size="4Mi", libvirt=bad))
    assert (status_of(new).phase, ready_reason(new)) == ("Failed", "InvalidSpec")
    assert status_of(new).path is None
