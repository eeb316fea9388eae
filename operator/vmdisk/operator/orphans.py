"""Host truth vs. resources: report disks on this host that no resource owns.

Never deletes anything: an orphan may be a disk whose VMDisk was deleted
with ``deletionPolicy: Retain``, or data someone wants back.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

from ..api.common import now_rfc3339
from ..backends.base import DiskRef
from ..engine.reconcile import Engine
from ..errors import VMDiskError
from ..host.files import atomic_write
from .kubeapi import KubeApi

log = logging.getLogger(__name__)
REPORT = "orphans.json"


def owned_here(objects: list[dict[str, object]], node: str) -> set[DiskRef]:
    """The disks of the VMDisks assigned to ``node``."""
    owned = set()
    for obj in objects:
        meta, spec = obj.get("metadata"), obj.get("spec")
        if isinstance(meta, dict) and isinstance(spec, dict) and spec.get("nodeName") == node:
            owned.add(DiskRef(str(meta.get("namespace", "default")), str(meta.get("name"))))
    return owned


class OrphanScanner:
    """Periodically compares the host's disks with this node's VMDisks."""

    def __init__(self, engine: Engine, api: Callable[[], KubeApi | None], interval: float) -> None:
        self.engine = engine
        self.api = api
        self.interval = interval
        self.reported: set[DiskRef] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="orphan-scanner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except (VMDiskError, OSError) as exc:
                log.warning("orphan scan failed: %s", exc)

    def scan(self) -> set[DiskRef]:
        """One comparison; new orphans get an Event on the Node and a log line."""
        api = self.api()
        if api is None:
            return set()
        node = self.engine.settings.node_name
        owned = {ref.key for ref in owned_here(api.list_objects("vmdisks"), node)}
        orphans = {ref for ref in self.engine.host_disks() if ref.key not in owned}
        for ref in sorted(orphans - self.reported, key=str):
            message = f"disk data for {ref} exists on this node but no VMDisk owns it"
            log.warning("orphan: %s", message)
            api.node_event(node, "Warning", "OrphanDisk", message)
        self.reported = orphans
        report = {"time": now_rfc3339(), "node": node, "orphans": sorted(map(str, orphans))}
        atomic_write(self.engine.layout.root / REPORT, json.dumps(report, indent=1) + "\n")
        return orphans
