"""A throw-away single-node Ceph cluster on loopback, for the rbd tests.

Load as a pytest plugin (``pytest_plugins = ["ceph"]``).  The session
fixture ``ceph_cluster`` starts one ``ceph-mon`` (msgr v1 and v2 on free
loopback ports) and one ``ceph-osd`` with ``osd objectstore = memstore``,
``auth ... = none`` and pool size 1, in a temporary directory (~4 s), and
stops both afterwards.  Both run in the foreground under the test session,
so nothing outlives it.

``pause_osd()``/``resume_osd()`` freeze and thaw the OSD (SIGSTOP/SIGCONT):
clients see an OSD that stopped answering.  A real stop would not do: a
memstore OSD keeps its objects in memory and loses them when it exits.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class CephTestCluster:
    root: Path
    conf: Path
    fsid: str
    mon_v1: int
    mon_v2: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def ceph(self, *args: str, timeout: float = 60.0) -> str:
        """Run the ``ceph`` CLI against this cluster; its stdout."""
        return self._cli("ceph", args, timeout)

    def rbd(self, *args: str, timeout: float = 120.0) -> str:
        """Run the ``rbd`` CLI against this cluster; its stdout."""
        return self._cli("rbd", args, timeout)

    def _cli(self, tool: str, args: tuple[str, ...], timeout: float) -> str:
        proc = subprocess.run(
            [tool, "--conf", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def create_pool(self, name: str) -> str:
        """An RBD pool (8 PGs, size 1); returns its name. Existing pools are kept."""
        self.ceph("osd", "pool", "create", name, "8")
        self.ceph("osd", "pool", "application", "enable", name, "rbd")
        return name

    def start_mgr(self, timeout: float = 90.0) -> None:
        """Start a ceph-mgr (idempotent); it serves what ``ceph df`` reports (pool usage).

        Not started by default: only capacity tests need it, and it adds
        seconds to the cluster's start.
        """
        if "mgr" in self.procs:
            return
        (self.root / "mgr" / "x").mkdir(parents=True, exist_ok=True)
        self._start("mgr", ["ceph-mgr", "--conf", str(self.conf), "-f", "-i", "x"])
        deadline = time.monotonic() + timeout
        while True:
            try:
                df = json.loads(self.ceph("df", "--format", "json", timeout=10))
                if df["stats"]["total_bytes"] > 0:
                    return
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or self.procs["mgr"].poll() is not None:
                raise RuntimeError(f"ceph-mgr did not report usage; logs in {self.root / 'log'}")
            time.sleep(0.5)

    def pause_osd(self) -> None:
        self.procs["osd"].send_signal(signal.SIGSTOP)

    def resume_osd(self) -> None:
        self.procs["osd"].send_signal(signal.SIGCONT)

    def osd_up(self) -> bool:
        try:
            stat = json.loads(self.ceph("osd", "stat", "--format", "json", timeout=10))
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return int(stat.get("num_up_osds", 0)) == 1

    def _start(self, key: str, argv: list[str]) -> None:
        log = (self.root / "log" / f"{key}.out").open("ab")
        with log:
            self.procs[key] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        for key in ("mgr", "osd", "mon"):
            proc = self.procs.pop(key, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _config(root: Path, fsid: str, v1: int, v2: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {4 * 1024**3}
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
mon data = {root}/mon/$id
mgr data = {root}/mgr/$id
osd data = {root}/osd/$id
"""


def start_cluster(root: Path) -> CephTestCluster:
    for sub in ("run", "log", "mon/a", "osd/0"):
        (root / sub).mkdir(parents=True)
    fsid = str(uuid.uuid4())
    v1, v2 = _free_port(), _free_port()
    conf = root / "ceph.conf"
    conf.write_text(_config(root, fsid, v1, v2))
    cluster = CephTestCluster(root, conf, fsid, v1, v2)
    monmap = root / "monmap"
    subprocess.run(
        ["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
         f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]", str(monmap)],
        check=True, capture_output=True,
    )  # fmt: skip
    base = ["--conf", str(conf)]
    subprocess.run(
        ["ceph-mon", *base, "--mkfs", "-i", "a", "--monmap", str(monmap)],
        check=True,
        capture_output=True,
    )
    cluster._start("mon", ["ceph-mon", *base, "-f", "-i", "a"])
    osd_uuid = str(uuid.uuid4())
    osd_id = cluster.ceph("osd", "new", osd_uuid).strip()
    subprocess.run(
        ["ceph-osd", *base, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid],
        check=True,
        capture_output=True,
    )
    cluster._start("osd", ["ceph-osd", *base, "-f", "-i", osd_id])
    deadline = time.monotonic() + START_TIMEOUT
    while not cluster.osd_up():
        if time.monotonic() > deadline or cluster.procs["osd"].poll() is not None:
            cluster.stop()
            raise RuntimeError(f"the Ceph OSD did not come up; logs in {root / 'log'}")
        time.sleep(0.2)
    return cluster


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephTestCluster]:
    """A running single-node Ceph cluster (mon + memstore OSD, auth none)."""
    for tool in ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is not installed: scripts/setup.sh installs ceph-mon ceph-osd ceph-common"
            )
    import rbd  # noqa: F401  (python3-rbd, installed by scripts/setup.sh; missing is a failure)

    # A short path: the admin sockets must fit in sun_path (108 bytes).
    root = Path(tmp_path_factory.mktemp("ceph", numbered=True))
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()
