"""The agent and a running VM: a grow goes online, a restore and a snapshot wait with
DiskInUse, and both complete on their own (kopf's retry) once the domain is gone.

The agent is the real ``vmdisk run`` process with its default libvirt URI; the
domain is started by the suite's libvirtd on the XML the agent wrote to status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agents import Agent, assert_clean, phase, vmdisk
from apiserver import Kube
from conftest import MiB
from libvirtd import running_domain

pytestmark = pytest.mark.libvirtd

Obj = dict[str, Any]


def status(obj: Obj | None) -> Obj:
    return (obj or {}).get("status") or {}


def reason(obj: Obj | None) -> str | None:
    ready = [c for c in status(obj).get("conditions", []) if c["type"] == "Ready"]
    return ready[0]["reason"] if ready else None


def test_running_vm_grows_online_and_offline_requests_wait_then_complete(
    kube: Kube, agents: Callable[..., Agent], libvirt_system: Any
) -> None:
    agents("node-a")
    kube.create(vmdisk("vm", size="16Mi"))
    ready = kube.wait_for("vmdisks", "vm", phase("Ready"), timeout=90)
    assert ready is not None
    kube.create(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "golden"},
            "spec": {"diskName": "vm"},
        }
    )
    kube.wait_for("disksnapshots", "golden", lambda o: bool(status(o).get("readyToUse")))
    xml = status(ready)["libvirtXML"]

    with running_domain(libvirt_system, xml) as domain:
        kube.patch("vmdisks", "vm", {"spec": {"size": "32Mi"}})
        grown = kube.wait_for(
            "vmdisks", "vm", lambda o: status(o).get("resizedOnline") is True, timeout=90
        )
        assert grown is not None and status(grown)["virtualSize"] == 32 * MiB
        assert status(grown)["libvirtXML"] == xml
        assert domain.blockInfo("vda")[0] == 32 * MiB

        kube.patch("vmdisks", "vm", {"spec": {"restore": {"snapshot": "golden"}}})
        kube.create(
            {
                "apiVersion": "vmdisk.io/v1alpha1",
                "kind": "DiskSnapshot",
                "metadata": {"name": "live"},
                "spec": {"diskName": "vm"},
            }
        )
        held = kube.wait_for("vmdisks", "vm", lambda o: reason(o) == "DiskInUse", timeout=90)
        assert held is not None and domain.name() in str(status(held)["conditions"])
        waiting = kube.wait_for(
            "disksnapshots", "live", lambda o: reason(o) == "DiskInUse", timeout=90
        )
        assert waiting is not None and status(waiting)["phase"] == "Pending"
        assert "restoredSnapshot" not in status(kube.get("vmdisks", "vm"))
        domain.destroy()

    # Nobody touches the objects again: the agent's own retries finish both.
    restored = kube.wait_for(
        "vmdisks",
        "vm",
        lambda o: status(o).get("restoredSnapshot") == "golden" and reason(o) == "Provisioned",
        timeout=120,
    )
    assert restored is not None and status(restored)["phase"] == "Ready"
    kube.wait_for("disksnapshots", "live", lambda o: bool(status(o).get("readyToUse")), timeout=120)
    assert_clean(kube)
