"""Real `vmdisk run` agent processes for the integration tests, and their helpers.

A pytest plugin (listed in conftest): the ``agents`` fixture starts agents
against the real API server (``kube_api``), logged in as the chart's
ServiceAccount, and stops them, failing the test if any logged a traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from apiserver import Kube, KubeApiServer

Obj = dict[str, Any]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Agent:
    """One `vmdisk run` process for a node, with its own state dir and log."""

    def __init__(
        self,
        node: str,
        state: Path,
        kubeconfig: Path,
        image_dir: Path,
        extra_env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.node, self.state = node, state
        self.port = free_port()
        self.log = state.parent / f"agent-{node}.log"
        argv = [
            sys.executable, "-m", "vmdisk.cli", "run",
            "--node", node, "--state-dir", str(state),
            "--liveness", f"http://127.0.0.1:{self.port}/healthz",
            "--verify-interval", "1", "--scan-interval", "1", *extra_args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "VMDISK_IMAGE_DIRS": str(image_dir),
            "VMDISK_IMAGE_HOSTS": "127.0.0.1/32",  # the tests' image servers
        }
        env.update(extra_env or {})
        with open(self.log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agents(kube: Kube, tmp_path: Path, image_dir: Path) -> Iterator[Callable[..., Agent]]:
    kubeconfig = kube.server.agent_kubeconfig
    started: list[Agent] = []

    def start(
        node: str = "node-a",
        state: Path | None = None,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> Agent:
        state = state or tmp_path / f"state-{node}"
        agent = Agent(node, state, kubeconfig, image_dir, env, args)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
    for agent in started:
        # Captured, so shown only when the test fails: what the agent was doing.
        print(
            f"--- the last of agent {agent.node}'s log ---",
            *agent.logs().splitlines()[-60:],
            sep="\n",
        )
        assert "Traceback" not in agent.logs(), agent.logs()


def vmdisk(name: str, node: str = "node-a", **spec: Any) -> Obj:
    """A VMDisk manifest (the namespace is the test's, set by `Kube.create`)."""
    spec.setdefault("backend", "qcow2")
    spec.setdefault("source", {"blank": {}})
    spec.setdefault("size", "16Mi")
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": name},
        "spec": {"nodeName": node, **spec},
    }


def phase(*wanted: str, reason: str | None = None) -> Callable[[Obj | None], bool]:
    def check(obj: Obj | None) -> bool:
        status = (obj or {}).get("status") or {}
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        return status.get("phase") in wanted and (reason is None or ready.get("reason") == reason)

    return check


def ready_reason(obj: Obj | None) -> str:
    conditions = ((obj or {}).get("status") or {}).get("conditions", [])
    return next(c["reason"] for c in conditions if c["type"] == "Ready")


def agent_requests(server: KubeApiServer, since: str) -> list[Obj]:
    """The audit events of the agents' requests answered since ``since`` (RFC 3339)."""
    return [
        e
        for e in server.audit()
        if e["user"]["username"] == server.agent_user and e["requestReceivedTimestamp"] >= since
    ]


def assert_clean(kube: Kube) -> None:
    """The API server refused none of the agents' requests in this test.

    A 403 is a permission the chart's RBAC lacks; a 422 is an invalid write
    (the CRD schema refused a status or patch the agent made).  A 404 (an
    object deleted under a handler), a 409, a 429 (the server asks to retry,
    e.g. "storage is (re)initializing" while a changed CRD's watch cache
    refills) and a failed ``test`` of kopf's JSON patch (the API server's bare
    422, a lost race between two agents that kopf retries) are ordinary, and so
    is the 400 of the agent's probe for a server-side node selector (CRDs
    without selectableFields), and a 504 "context canceled": a request in
    flight when a test stopped or restarted its agent (the client went away).
    """
    refused = [
        f"{e['responseStatus'].get('code')} {e['verb']} {e['requestURI']}: "
        f"{e['responseStatus'].get('message', '')}"
        for e in agent_requests(kube.server, kube.started)
        if e["responseStatus"].get("code", 200) not in {200, 201, 404, 409, 429}
        and not _lost_json_patch_test(e["responseStatus"])
        and not _node_selector_probe(e)
        and not _client_went_away(e["responseStatus"])
    ]
    assert refused == []


def _client_went_away(status: Obj) -> bool:
    return status.get("code") == 504 and "context canceled" in status.get("message", "")


def _node_selector_probe(event: Obj) -> bool:
    return (
        event["verb"] == "list"
        and event["responseStatus"].get("code") == 400
        and "fieldSelector=spec.nodeName" in event["requestURI"]
    )


def _lost_json_patch_test(status: Obj) -> bool:
    return (
        status.get("code") == 422
        and not status.get("details")
        and status.get("message")
        == "the server rejected our request due to an error in our request"
    )
