"""``vmdisk run``: the node agent a DaemonSet runs on every node."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from ..api.common import GROUP
from ..config import Settings
from ..engine.reconcile import Engine
from ..errors import VMDiskError
from ..host.files import atomic_write
from . import handlers, keys
from .kubeapi import ApiConnection, ApiSecrets, KubeApi
from .metrics import Metrics, track_phases
from .orphans import OrphanScanner

log = logging.getLogger(__name__)


def operator_settings(node: str, workers: int) -> kopf.OperatorSettings:
    """kopf settings chosen for a node-local DaemonSet."""
    s = kopf.OperatorSettings()
    # Every node runs an agent of equal priority; peering would freeze all but one.
    s.peering.standalone = True
    # Per-node keys: agents never overwrite each other's bookkeeping.
    prefix = keys.annotation_prefix(node)
    s.persistence.finalizer = keys.finalizer(node)
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    # Bound concurrent provisioning per node: each sync handler takes one worker.
    s.execution.max_workers = workers
    # After its own patch kopf waits for that version to come back before judging the
    # object again; under load (hundreds of disks at once) the event takes longer than
    # the default 5 s, kopf then takes an older body for the truth and runs the create
    # handler a second time.  A newer event still wakes it at once.
    s.persistence.consistency_timeout = 60.0
    # Reconnect watches regularly so a silently dropped connection is noticed.
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    s.watching.connect_timeout = 30
    s.posting.level = logging.INFO
    return s


def _path(value: object) -> str | None:
    return None if value is None else os.fsdecode(value)  # type: ignore[arg-type]


def _connection(info: kopf.ConnectionInfo, settings: Settings, pool_size: int) -> ApiConnection:
    cert_path, key_path = _path(info.certificate_path), _path(info.private_key_path)
    if info.certificate_data and info.private_key_data:
        # The client takes client certificates only as files; keep them in the state dir.
        run_dir = settings.state_dir / "run"
        cert_path, key_path = str(run_dir / "client.crt"), str(run_dir / "client.key")
        atomic_write(run_dir / "client.crt", info.certificate_data, mode=0o600)
        atomic_write(run_dir / "client.key", info.private_key_data, mode=0o600)
    return ApiConnection(
        server=info.server,
        token=info.token,
        ca_path=_path(info.ca_path),
        ca_data=info.ca_data.encode() if isinstance(info.ca_data, str) else info.ca_data,
        insecure=bool(info.insecure),
        cert_path=cert_path,
        key_path=key_path,
        pool_size=pool_size,
    )


def node_selector(node: str) -> str:
    """The field selector of this node's VMDisks."""
    return f"spec.nodeName={node}"


def select_own_disks(api: KubeApi, node: str, settings: kopf.OperatorSettings) -> None:
    """Watch only this node's VMDisks when the server can filter them (CRD selectableFields).

    Otherwise every agent is sent every VMDisk and filters by node itself, as the
    handlers' own filter still does either way.  Decided once, before the watches start.
    """
    if (GROUP, "vmdisks") in settings.watching.field_selectors:
        return  # a re-login: the watches keep what they started with
    selector = node_selector(node)
    try:
        filtered = api.selects_on("vmdisks", selector)
    except VMDiskError as exc:
        log.warning("could not ask for server-side filtering (%s): watching every VMDisk", exc)
        filtered = False
    if filtered:
        settings.watching.field_selectors[GROUP, "vmdisks"] = selector
        log.info("watching the VMDisks of node %s only (field selector %s)", node, selector)
    else:
        log.info("the server cannot select VMDisks by spec.nodeName: watching them all")


def build_registry(
    engine: Engine, *, scan_interval: float, verify_interval: float, workers: int = 4
) -> kopf.OperatorRegistry:
    """All handlers of the agent, on a registry of its own."""
    registry = kopf.OperatorRegistry()
    handlers.register(registry, engine, verify_interval=verify_interval)

    @kopf.on.login(registry=registry)
    def login(
        *, memo: Any, settings: kopf.OperatorSettings, **kwargs: Any
    ) -> kopf.ConnectionInfo | None:
        # The client's in-cluster config reaches the API server at KUBERNETES_SERVICE_HOST
        # and _PORT, as client-go does: kopf's own service-account login assumes the name
        # kubernetes.default.svc, which a pod without cluster DNS (hostNetwork) cannot resolve.
        info = kopf.login_via_client(settings=settings, **kwargs)
        if info is not None:
            # Each worker may publish progress while the scanner and Secrets lookups call too.
            memo.api = KubeApi.connect(_connection(info, engine.settings, workers + 2))
            select_own_disks(memo.api, engine.settings.node_name, settings)
        return info

    @kopf.on.startup(registry=registry)
    def start_scanner(*, memo: Any, **_: Any) -> None:
        memo.scanner = OrphanScanner(engine, lambda: getattr(memo, "api", None), scan_interval)
        memo.scanner.start()

    @kopf.on.cleanup(registry=registry)
    def stop_scanner(*, memo: Any, **_: Any) -> None:
        scanner = getattr(memo, "scanner", None)
        if scanner is not None:
            scanner.stop()
        api = getattr(memo, "api", None)
        if api is not None:
            api.close()

    return registry


def run(
    settings: Settings,
    *,
    liveness: str | None = None,
    workers: int = 4,
    namespaces: tuple[str, ...] = (),
    scan_interval: float = 600.0,
    verify_interval: float = 60.0,
    metrics_port: int | None = None,
    metrics_address: str = "0.0.0.0",
) -> None:
    """Run the node agent until it is stopped."""
    metrics = Metrics(settings.node_name) if metrics_port is not None else None
    memo = kopf.Memo()
    engine = Engine.build(
        settings, observer=metrics, secrets=ApiSecrets(lambda: getattr(memo, "api", None))
    )
    registry = build_registry(
        engine, scan_interval=scan_interval, verify_interval=verify_interval, workers=workers
    )
    log.info("vmdisk agent for node %s, state in %s", settings.node_name, settings.state_dir)
    if metrics is not None and metrics_port is not None:
        track_phases(registry, metrics)
        metrics.watch_engine(engine)
        port = metrics.serve(metrics_port, metrics_address)
        log.info("metrics on %s port %d", metrics_address, port)
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=operator_settings(settings.node_name, workers),
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=liveness,
                standalone=True,
                memo=memo,
            )
        )
    finally:
        engine.close()
        if metrics is not None:
            metrics.stop()
