"""Prometheus metrics of a node agent, served on their own port.

The engine and the image cache report through their ``Observer`` hooks
(`vmdisk.engine.reconcile.Observer`); this adapter turns those reports into metrics.
Disks per phase come from the API's own truth (a kopf event handler on this
node's VMDisks), free space from the state directory and from any backend
that can tell (`SupportsCapacity`).  Every metric lives on a registry of its
own: nothing global, so tests and several agents in one process never mix.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from .. import __version__
from ..api.common import GROUP, VERSION
from ..api.vmdisk import VMDiskStatus
from ..backends.base import SupportsCapacity
from ..engine.reconcile import Engine
from .orphans import REPORT

PHASES = ("Pending", "Provisioning", "Ready", "Failed", "Deleting")
# Disk work spans milliseconds (a blank qcow2) to an hour (a large download).
_RECONCILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
_FETCH_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 900, 3600)


def result_of(status: VMDiskStatus) -> str:
    """The ``result`` label: ready, failed (permanent, until the spec changes) or retry."""
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    if ready is not None and ready.status == "True":
        return "ready"
    return "failed" if status.phase == "Failed" else "retry"


class Metrics:
    """The agent's metrics; implements the engine's `Observer`."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "vmdisk_reconcile",
            "VMDisk reconciliations by backend and result (ready, failed, retry).",
            ["backend", "result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "vmdisk_reconcile_duration_seconds",
            "Time spent reconciling one VMDisk.",
            ["backend", "result"],
            buckets=_RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "vmdisk_image_cache_lookups",
            "Base image cache lookups by result (hit, miss).",
            ["result"],
            registry=self.registry,
        )
        self.fetch_bytes = Counter(
            "vmdisk_image_fetch_bytes",
            "Bytes of images fetched into the cache, by URL scheme.",
            ["scheme"],
            registry=self.registry,
        )
        self.fetch_seconds = Histogram(
            "vmdisk_image_fetch_duration_seconds",
            "Time spent fetching one image into the cache, by URL scheme.",
            ["scheme"],
            buckets=_FETCH_BUCKETS,
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._missing: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None

    # -- engine and cache observer ---------------------------------------------
    def disk_reconciled(self, backend: str, status: VMDiskStatus, seconds: float) -> None:
        result = result_of(status)
        self.reconciles.labels(backend, result).inc()
        self.reconcile_seconds.labels(backend, result).observe(seconds)

    def cache_lookup(self, hit: bool) -> None:
        self.cache_lookups.labels("hit" if hit else "miss").inc()

    def image_fetched(self, scheme: str, size: int, seconds: float) -> None:
        self.fetch_bytes.labels(scheme).inc(size)
        self.fetch_seconds.labels(scheme).observe(seconds)

    # -- disks per phase -------------------------------------------------------
    def disk_seen(
        self, namespace: str, name: str, phase: str | None, reason: str | None = None
    ) -> None:
        """Record a VMDisk's phase (and Ready reason) as the API has it; None when it is gone."""
        key = (namespace, name)
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
                self._missing.discard(key)
            else:
                self._phases[key] = phase
                if reason == "DiskMissing":
                    self._missing.add(key)
                else:
                    self._missing.discard(key)

    def missing_count(self) -> int:
        with self._lock:
            return len(self._missing)

    def phase_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(PHASES, 0)
        with self._lock:
            for phase in self._phases.values():
                counts[phase] = counts.get(phase, 0) + 1
        return counts

    def watch_engine(self, engine: Engine) -> None:
        """Report the engine's state (cache size, free space) at every scrape."""
        self.registry.register(_EngineCollector(self, engine))

    # -- serving ---------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``addr:port`` in a thread; returns the bound port."""
        self._server, _ = start_http_server(port, addr, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _EngineCollector(Collector):
    """Gauges read from the host at scrape time."""

    def __init__(self, metrics: Metrics, engine: Engine) -> None:
        self.metrics = metrics
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "vmdisk_agent_info", "The agent's version and node.", labels=["version", "node"]
        )
        info.add_metric([__version__, self.metrics.node], 1)
        yield info
        disks = GaugeMetricFamily("vmdisk_disks", "This node's VMDisks by phase.", labels=["phase"])
        for phase, count in sorted(self.metrics.phase_counts().items()):
            disks.add_metric([phase], count)
        yield disks
        entries = self.engine.cache.index.entries(set()) if self.engine.cache.root.is_dir() else []
        yield GaugeMetricFamily(
            "vmdisk_image_cache_bytes",
            "Bytes the base image cache occupies on disk.",
            value=sum(e.size for e in entries),
        )
        yield GaugeMetricFamily(
            "vmdisk_image_cache_entries", "Images in the base image cache.", value=len(entries)
        )
        yield from self._host_truth()
        yield from self._free_space()

    def _host_truth(self) -> Iterator[Metric]:
        """Disks whose data vanished (from status) and orphans (from the last scan)."""
        yield GaugeMetricFamily(
            "vmdisk_missing_disks",
            "This node's VMDisks whose data vanished from the host (reason DiskMissing).",
            value=self.metrics.missing_count(),
        )
        report = self.engine.layout.root / REPORT
        try:
            orphans = len(json.loads(report.read_text())["orphans"])
        except (OSError, ValueError, KeyError):
            return  # no scan yet
        yield GaugeMetricFamily(
            "vmdisk_orphan_disks",
            "Disk data on this node that no VMDisk owns, as of the last orphan scan.",
            value=orphans,
        )

    def _free_space(self) -> Iterator[Metric]:
        state = self.engine.layout.root
        if state.is_dir():
            vfs = os.statvfs(state)
            yield GaugeMetricFamily(
                "vmdisk_state_dir_free_bytes",
                "Free bytes in the state directory (file-based backends and the cache).",
                value=vfs.f_bavail * vfs.f_frsize,
            )
        labels = ["backend", "placement"]
        free = GaugeMetricFamily(
            "vmdisk_backend_free_bytes",
            "Free bytes per backend placement (pool, volume group), where the backend knows.",
            labels=labels,
        )
        size = GaugeMetricFamily(
            "vmdisk_backend_size_bytes", "Size of each backend placement.", labels=labels
        )
        thin = GaugeMetricFamily(
            "vmdisk_backend_thin_pool_free_bytes",
            "Unwritten bytes in the thin pool.",
            labels=labels,
        )
        for name, backend in sorted(self.engine.registry.backends.items()):
            if isinstance(backend, SupportsCapacity):
                try:
                    capacity = backend.capacity()
                except Exception:  # a scrape never fails because one backend cannot answer
                    continue
                free.add_metric([name, capacity.placement], capacity.free)
                size.add_metric([name, capacity.placement], capacity.size)
                if capacity.thin_pool_free is not None:
                    thin.add_metric([name, capacity.placement], capacity.thin_pool_free)
        yield from (free, size, thin)


def phase_and_reason(raw: Any) -> tuple[str, str | None]:
    """A raw status's phase and Ready reason; a malformed status counts as Pending.

    Events carry whatever was written, admission or not: never trust their shape.
    """
    try:
        status = VMDiskStatus.model_validate(raw or {})
    except ValidationError:
        return "Pending", None
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    return status.phase or "Pending", ready.reason if ready else None


def track_phases(registry: kopf.OperatorRegistry, metrics: Metrics) -> None:
    """Keep ``vmdisk_disks{phase}`` in step with the API's view of this node's VMDisks."""
    node = metrics.node

    def on_this_node(*, spec: Any, **_: Any) -> bool:
        return bool(spec.get("nodeName") == node)

    @kopf.on.event(
        GROUP, VERSION, "vmdisks", when=on_this_node, id="metrics_phase", registry=registry
    )
    def metrics_phase(*, type: Any, namespace: Any, name: Any, status: Any, **_: Any) -> None:
        if type == "DELETED":
            metrics.disk_seen(namespace, name, None)
            return
        metrics.disk_seen(namespace, name, *phase_and_reason(status))
