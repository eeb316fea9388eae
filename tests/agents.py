"""Real `vmdisk run` agent processes for the integration tests, and their helpers.

A pytest plugin (listed in conftest): the ``agents`` fixture starts agents
against the kmock API server of the ``kubeconfig`` fixture and stops them,
failing the test if any logged a traceback.
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

from kube import KubeApi

NS = "default"
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
def agents(kubeconfig: Path, tmp_path: Path, image_dir: Path) -> Iterator[Callable[..., Agent]]:
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
        assert "Traceback" not in agent.logs(), agent.logs()


def vmdisk(name: str, node: str = "node-a", **spec: Any) -> Obj:
    spec.setdefault("backend", "qcow2")
    spec.setdefault("source", {"blank": {}})
    spec.setdefault("size", "16Mi")
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": name, "namespace": NS},
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


def assert_clean(api: KubeApi) -> None:
    """Everything the agent wrote was valid under the CRD schema.

    A failed ``test`` in kopf's optimistic JSON patch is a lost race between
    two writers (kopf re-reads and retries), not an invalid write.
    """
    invalid = [
        r.get("message", "")
        for r in api.rejections
        if not r.get("message", "").startswith("the JSON patch was not applied")
    ]
    assert invalid == []
    assert api.server.pruned == []
