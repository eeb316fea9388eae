"""(rbd) 20 disks from one image: copy-on-write clones vs full imports, on a real Ceph.

Starts the tests' throw-away single-node cluster (one mon, one memstore OSD)
in the work directory.  The engine side is the rbd backend's ``create``
(clone of ``rbd://fsid/images/base/snap``; import of the cached image with
``qemu-img convert`` into the pool), the baselines are ``rbd clone`` and
``rbd import`` run directly.  Bytes written to the pool are the images' own
allocation (``rbd du``), so a clone's shared parent data is not counted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from vmdisk.backends.base import BaseImage, CreateRequest, DiskRef, FromImage, FromStore
from vmdisk.backends.rbd import RbdBackend
from vmdisk.backends.rbd_config import RbdSettings
from vmdisk.layout import StateLayout

from .harness import MiB, Row, Stats, fmt_s, ratio, timed, write_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ceph import CephTestCluster, start_cluster

DISKS = 20
SIZE = 256 * MiB
DATA = 64 * MiB
CLONE_TARGET = 3.0  # python-side checks (fsid, parent size, metadata) on top of rbd clone
IMPORT_TARGET = 1.5


def _used(cluster: CephTestCluster, pool: str) -> int:
    report = json.loads(cluster.rbd("du", "--format", "json", "-p", pool))
    return int(report.get("total_used_size", 0))


def _series(make: Callable[[int], object]) -> Stats:
    return Stats(tuple(timed(lambda i=i: make(i)) for i in range(DISKS)))


def run(workdir: Path) -> list[Row]:
    image = workdir / "base.raw"
    write_image(image, SIZE, DATA)
    cluster = start_cluster(workdir / "ceph")
    try:
        for pool in ("images", "clones", "rclones", "imports", "rimports"):
            cluster.create_pool(pool)
        cluster.rbd("import", str(image), "images/base")
        cluster.rbd("snap", "create", "images/base@snap")
        cluster.rbd("snap", "protect", "images/base@snap")
        url = f"rbd://{cluster.fsid}/images/base/snap"
        settings = RbdSettings(
            pools=("clones", "imports"), ceph_confs=(cluster.conf,), node_name="bench"
        )
        backend = RbdBackend(settings, StateLayout(workdir / "state"))
        base = BaseImage("sha256-bench", image, "raw", SIZE)
        try:
            backend.state(DiskRef("bench", "warm-up", "clones"))  # connect once, not timed
            clone = _series(
                lambda i: backend.create(
                    DiskRef("bench", f"d{i}", "clones"), CreateRequest(SIZE, FromStore(url))
                )
            )
            rclone = _series(lambda i: cluster.rbd("clone", "images/base@snap", f"rclones/d{i}"))
            full = _series(
                lambda i: backend.create(
                    DiskRef("bench", f"d{i}", "imports"), CreateRequest(SIZE, FromImage(base))
                )
            )
            rimport = _series(lambda i: cluster.rbd("import", str(image), f"rimports/d{i}"))
        finally:
            backend.close()
        written = {p: _used(cluster, p) for p in ("clones", "rclones", "imports", "rimports")}
    finally:
        cluster.stop()
    per = {p: b / DISKS for p, b in written.items()}
    mib = 1024 * 1024
    return [
        Row(
            f"(rbd) COW clone of a protected snapshot, per disk ({DISKS} disks), median",
            f"{fmt_s(clone.median)}, {per['clones'] / mib:.2f} MiB written",
            f"rbd clone: {fmt_s(rclone.median)}, {per['rclones'] / mib:.2f} MiB",
            ratio(clone.median, rclone.median),
            f"≤ {CLONE_TARGET}x",
            clone.median <= CLONE_TARGET * rclone.median,
        ),
        Row(
            f"(rbd) full import of a {SIZE // mib} MiB image ({DATA // mib} MiB data), "
            "per disk, median",
            f"{fmt_s(full.median)}, {per['imports'] / mib:.1f} MiB written",
            f"rbd import: {fmt_s(rimport.median)}, {per['rimports'] / mib:.1f} MiB",
            ratio(full.median, rimport.median),
            f"≤ {IMPORT_TARGET}x",
            full.median <= IMPORT_TARGET * rimport.median,
        ),
        Row(
            "(rbd) clone vs import: time and bytes written per disk, median",
            f"clone {fmt_s(clone.median)} / {per['clones'] / mib:.2f} MiB",
            f"import {fmt_s(full.median)} / {per['imports'] / mib:.1f} MiB",
            ratio(clone.median, full.median),
            "clone bytes < 1% of import bytes (time ratio shown, not judged)",
            per["clones"] < 0.01 * per["imports"],
        ),
    ]
