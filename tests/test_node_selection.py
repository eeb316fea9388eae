"""Each agent is sent only its own node's VMDisks where the server can select them.

With ``vmdisk crds --selectable-fields`` (CRD ``selectableFields`` on
``spec.nodeName``, Kubernetes 1.31+) the agents watch with a field selector; a
1.29 server refuses that CRD field, and the agents there watch every VMDisk and
filter by node themselves, as with the usual CRDs on any version.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest

from agents import Agent, agent_requests, assert_clean, phase, vmdisk
from apiserver import Kube, KubectlError


def _vmdisk_watches(kube: Kube) -> list[str]:
    """The field selectors of the agents' VMDisk watches in this test ("" for none)."""
    found = []
    for e in agent_requests(kube.server, kube.started):
        url = urlsplit(e["requestURI"])
        if e["verb"] == "watch" and url.path.endswith("/vmdisks"):
            found.append(parse_qs(url.query).get("fieldSelector", [""])[0])
    return found


def _two_agents_provision(kube: Kube, agents: Callable[..., Agent]) -> tuple[Agent, Agent]:
    a, b = agents("node-a"), agents("node-b")
    kube.create(vmdisk("on-a", node="node-a"))
    kube.create(vmdisk("on-b", node="node-b"))
    kube.wait_for("vmdisks", "on-a", phase("Ready"), timeout=60)
    kube.wait_for("vmdisks", "on-b", phase("Ready"), timeout=60)
    for name in ("on-a", "on-b"):
        kube.delete("vmdisks", name)
        kube.wait_for("vmdisks", name, lambda obj: obj is None, timeout=60)
    return a, b


def test_agents_watch_only_their_node_where_the_server_selects(
    kube: Kube, agents: Callable[..., Agent]
) -> None:
    server = kube.server
    if not server.selects_fields:
        # Why the checked-in CRDs leave the field out: the minimum version refuses it.
        with pytest.raises(KubectlError, match="selectableFields"):
            server.apply(server.selectable_crds())
        return
    with server.node_selectable_crds():
        a, b = _two_agents_provision(kube, agents)
        watches = _vmdisk_watches(kube)
        a.stop()
        b.stop()  # before the usual CRD returns
    assert sorted(set(watches)) == ["spec.nodeName=node-a", "spec.nodeName=node-b"]
    assert "watching the VMDisks of node node-a only" in a.logs()
    assert_clean(kube)


def test_agents_filter_themselves_without_selectable_fields(
    kube: Kube, agents: Callable[..., Agent]
) -> None:
    """The usual CRDs (the 1.29 minimum's): every agent watches all, each handles its own."""
    _, b = _two_agents_provision(kube, agents)
    assert set(_vmdisk_watches(kube)) == {""}
    assert "cannot select VMDisks by spec.nodeName: watching them all" in b.logs()
    assert_clean(kube)
