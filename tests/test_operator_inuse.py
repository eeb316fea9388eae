"""The agent and a running VM: a grow goes online, a restore and a snapshot wait with
DiskInUse, and both complete on their own (kopf's retry) once the domain is gone.

The agent is the real ``vmdisk run`` process with its default libvirt URI; the
domain is started by the suite's libvirtd on the XML the agent wrote to status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agents import NS, Agent, assert_clean, phase, vmdisk
from conftest import MiB
from kube import KubeApi
from libvirtd import running_domain

pytestmark = pytest.mark.libvirtd

Obj = dict[str, Any]


def status(obj: Obj | None) -> Obj:
    return (obj or {}).get("status") or {}


def reason(obj: Obj | None) -> str | None:
    ready = [c for c in status(obj).get("conditions", []) if c["type"] == "Ready"]
    return ready[0]["reason"] if ready else None


def test_running_vm_grows_online_and_offline_requests_wait_then_complete(
    api_server: KubeApi, agents: Callable[..., Agent], libvirt_system: Any
) -> None:
    agents("node-a")
    api_server.create(vmdisk("vm", size="16Mi"))
    ready = api_server.wait_for("vmdisks", NS, "vm", phase("Ready"), timeout=90)
    assert ready is not None
    api_server.create(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "golden", "namespace": NS},
            "spec": {"diskName": "vm"},
        }
    )
    api_server.wait_for("disksnapshots", NS, "golden", lambda o: bool(status(o).get("readyToUse")))
    xml = status(ready)["libvirtXML"]

    with running_domain(libvirt_system, xml) as domain:
        api_server.patch("vmdisks", NS, "vm", {"spec": {"size": "32Mi"}})
        grown = api_server.wait_for(
            "vmdisks", NS, "vm", lambda o: status(o).get("resizedOnline") is True, timeout=90
        )
        assert grown is not None and status(grown)["virtualSize"] == 32 * MiB
        assert status(grown)["libvirtXML"] == xml
        assert domain.blockInfo("vda")[0] == 32 * MiB

        api_server.patch("vmdisks", NS, "vm", {"spec": {"restore": {"snapshot": "golden"}}})
        api_server.create(
            {
                "apiVersion": "vmdisk.io/v1alpha1",
                "kind": "DiskSnapshot",
                "metadata": {"name": "live", "namespace": NS},
                "spec": {"diskName": "vm"},
            }
        )
        held = api_server.wait_for(
            "vmdisks", NS, "vm", lambda o: reason(o) == "DiskInUse", timeout=90
        )
        assert held is not None and domain.name() in str(status(held)["conditions"])
        waiting = api_server.wait_for(
            "disksnapshots", NS, "live", lambda o: reason(o) == "DiskInUse", timeout=90
        )
        assert waiting is not None and status(waiting)["phase"] == "Pending"
        assert "restoredSnapshot" not in status(api_server.get("vmdisks", NS, "vm"))
        domain.destroy()

    # Nobody touches the objects again: the agent's own retries finish both.
    restored = api_server.wait_for(
        "vmdisks",
        NS,
        "vm",
        lambda o: status(o).get("restoredSnapshot") == "golden" and reason(o) == "Provisioned",
        timeout=120,
    )
    assert restored is not None and status(restored)["phase"] == "Ready"
    api_server.wait_for(
        "disksnapshots", NS, "live", lambda o: bool(status(o).get("readyToUse")), timeout=120
    )
    assert_clean(api_server)
