"""The ``vmdisk`` command: local mode (apply/get/delete), cache, CRDs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from . import __version__
from .api.common import dump
from .api.crd import MIN_KUBERNETES
from .api.quantity import format_bytes
from .api.snapshot import DiskSnapshot
from .config import Settings, parse_duration
from .engine.reconcile import Engine
from .errors import VMDiskError
from .host.files import host_error
from .layout import StateLayout
from .local.manifests import ManifestError, load
from .local.runner import LocalRunner
from .local.store import LocalStore, Plural, Resource

KIND_ALIASES: dict[str, Plural] = {
    "vmdisk": "vmdisks",
    "vmdisks": "vmdisks",
    "vmd": "vmdisks",
    "disksnapshot": "disksnapshots",
    "disksnapshots": "disksnapshots",
    "dsnap": "disksnapshots",
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="state directory [VMDISK_STATE_DIR]")
    common.add_argument("--node", help="this node's name [VMDISK_NODE_NAME, hostname]")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=("yaml", "json", "table"), default="table")
    output.add_argument("-n", "--namespace", help="only this namespace")

    parser = argparse.ArgumentParser(prog="vmdisk", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vmdisk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    apply = sub.add_parser("apply", parents=[common, output], help="reconcile manifests locally")
    apply.add_argument("-f", "--filename", type=Path, required=True, help="file or directory")

    get = sub.add_parser("get", parents=[common, output], help="show objects and their status")
    get.add_argument("kind", nargs="?", default="vmdisks", choices=sorted(KIND_ALIASES))
    get.add_argument("name", nargs="?")

    delete = sub.add_parser("delete", parents=[common], help="delete objects and their data")
    delete.add_argument("-f", "--filename", type=Path)
    delete.add_argument("-n", "--namespace", default="default")
    delete.add_argument("kind", nargs="?", choices=sorted(KIND_ALIASES))
    delete.add_argument("name", nargs="?")

    run = sub.add_parser("run", parents=[common], help="run the node agent (cluster mode)")
    run.add_argument(
        "--liveness", metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    run.add_argument("--workers", type=int, default=4, help="concurrent disk operations [4]")
    run.add_argument("--namespace", action="append", default=[], help="watch only these namespaces")
    run.add_argument(
        "--scan-interval", type=float, default=600.0, help="orphan scan period, seconds"
    )
    run.add_argument(
        "--verify-interval", type=float, default=60.0, help="host check of Ready disks, seconds"
    )
    run.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)"
    )
    run.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        metavar="ADDR",
        help="address the metrics endpoint binds, e.g. 127.0.0.1 or :: [0.0.0.0]",
    )
    run.add_argument("--log-format", choices=("text", "json"), default="text", help="[text]")

    orphans = sub.add_parser("orphans", parents=[common], help="disks on this host no object owns")
    orphans.add_argument("-n", "--namespace", help="only this namespace")

    needs = f"the CustomResourceDefinitions (they need Kubernetes {MIN_KUBERNETES} or newer)"
    crds = sub.add_parser("crds", help=f"print {needs}", description=f"Print {needs}.")
    crds.add_argument("--split", type=Path, metavar="DIR", help="write one file per CRD into DIR")

    cache = sub.add_parser("cache", parents=[common], help="inspect or prune the image cache")
    cache.add_argument("action", choices=("list", "prune"))
    cache.add_argument(
        "--max-age", help="prune entries unused for this long [VMDISK_CACHE_MAX_AGE]"
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(state_dir=args.state_dir, node_name=args.node)


def _runner(settings: Settings) -> LocalRunner:
    engine = Engine.build(settings)
    return LocalRunner(settings, engine, LocalStore(engine.layout))


def _table(objects: Sequence[Resource]) -> str:
    rows = []
    for obj in objects:
        if isinstance(obj, DiskSnapshot):
            st = obj.status
            rows.append(
                [
                    obj.metadata.name,
                    obj.spec.disk_name,
                    str(bool(st and st.ready_to_use)).lower(),
                    st.phase if st else "Pending",
                    (st.export_path if st else None) or "",
                ]
            )
            header = ["NAME", "DISK", "READY", "PHASE", "EXPORT"]
        else:
            ds = obj.status
            size = ds.virtual_size if ds and ds.virtual_size else None
            rows.append(
                [
                    obj.metadata.name,
                    (ds.backend if ds else None) or obj.spec.backend or "",
                    format_bytes(size) if size else str(obj.spec.size or ""),
                    ds.phase if ds else "Pending",
                    (ds.path if ds else None) or "",
                ]
            )
            header = ["NAME", "BACKEND", "SIZE", "PHASE", "PATH"]
    if not rows:
        return "No resources found."
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _print(objects: Sequence[Resource], fmt: str) -> None:
    if fmt == "json":
        data = [dump(o) for o in objects]
        print(json.dumps(data[0] if len(data) == 1 else {"items": data}, indent=2))
    elif fmt == "yaml":
        print(yaml.safe_dump_all([dump(o) for o in objects], sort_keys=False), end="")
    else:
        print(_table(objects))


def _not_ready(objects: Sequence[Resource]) -> list[str]:
    problems = []
    for obj in objects:
        status = obj.status
        if (
            status is not None
            and status.phase == "Ready"
            and all(c.status == "True" for c in status.conditions if c.type == "Ready")
        ):
            continue
        reason = next((c for c in (status.conditions if status else []) if c.type == "Ready"), None)
        detail = f"{reason.reason}: {reason.message}" if reason else "not reconciled"
        problems.append(f"{obj.kind}/{obj.metadata.name}: {detail}")
    return problems


def _cmd_apply(args: argparse.Namespace) -> int:
    settings = _settings(args)
    objects = load(args.filename, max_size=settings.max_virtual_size)
    runner = _runner(settings)
    try:
        results = runner.apply(objects)
    finally:
        runner.engine.close()
    _print(results, args.output)
    problems = _not_ready(results)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_get(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = LocalStore(StateLayout(settings.state_dir))
    plural = KIND_ALIASES[args.kind]
    objects: list[Resource]
    if args.name:
        found = store.get(plural, args.namespace or "default", args.name)
        if found is None:
            print(f"error: {plural} {args.name!r} not found", file=sys.stderr)
            return 1
        objects = [found]
    else:
        objects = store.list_objects(plural, args.namespace)
    _print(objects, args.output)
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    runner = _runner(_settings(args))
    if args.filename is not None:
        objects: list[Resource] = list(load(args.filename))
    elif args.kind and args.name:
        found = runner.store.get(KIND_ALIASES[args.kind], args.namespace, args.name)
        if found is None:
            print(f"error: {args.kind} {args.name!r} not found", file=sys.stderr)
            return 1
        objects = [found]
    else:
        print("error: give -f FILE_OR_DIR, or a kind and a name", file=sys.stderr)
        return 2
    try:
        problems = runner.delete(objects)
    finally:
        runner.engine.close()
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_crds(args: argparse.Namespace) -> int:
    """Print (or --split into files) the CRDs; they need Kubernetes 1.29 or newer."""
    from .api.crd import crd_yaml, crds, write_crds

    if args.split:
        for path in write_crds(args.split):
            print(path)
    else:
        print("---\n".join(crd_yaml(c) for c in crds()), end="")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = Engine.build(settings)
    in_use = engine.cache_in_use()
    if args.action == "list":
        entries = engine.cache.entries(in_use)
        print(f"{'ID':<73} {'FORMAT':<7} {'SIZE':>10} {'IN USE':<6} SOURCE")
        for e in entries:
            used = "yes" if e.in_use else "no"
            size = format_bytes(e.size)
            print(f"{e.id:<73} {e.format:<7} {size:>10} {used:<6} {e.source_url or ''}")
        return 0
    max_age = parse_duration(args.max_age) if args.max_age else settings.cache_max_age
    for e in engine.cache.prune(max_age, in_use):
        print(f"removed {e.id} ({format_bytes(e.size)})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .operator import logs
    from .operator.main import run  # kopf is needed only here

    logs.configure(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    run(
        _settings(args),
        liveness=args.liveness,
        workers=args.workers,
        namespaces=tuple(args.namespace),
        scan_interval=args.scan_interval,
        verify_interval=args.verify_interval,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
    )
    return 0


def _cmd_orphans(args: argparse.Namespace) -> int:
    """Disks on this host that no object owns: the agent's last scan, else local mode's."""
    engine = Engine.build(_settings(args))
    report = engine.layout.root / "orphans.json"
    if report.exists():
        data = json.loads(report.read_text())
        print(f"# agent scan of {data['time']} on node {data['node']}", file=sys.stderr)
        orphans = list(data["orphans"])
    else:
        owned = {
            f"{o.metadata.namespace}/{o.metadata.name}"
            for o in LocalStore(engine.layout).list_objects("vmdisks")
        }
        orphans = sorted(str(ref) for ref in engine.host_disks() if str(ref) not in owned)
    for ref in orphans:
        if args.namespace is None or ref.startswith(f"{args.namespace}/"):
            print(ref)
    return 0


COMMANDS = {
    "run": _cmd_run,
    "orphans": _cmd_orphans,
    "apply": _cmd_apply,
    "get": _cmd_get,
    "delete": _cmd_delete,
    "crds": _cmd_crds,
    "cache": _cmd_cache,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except ManifestError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad flag values, names leaving the state dir
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except VMDiskError as exc:  # the host, not the manifest: e.g. a full state filesystem
        print(f"error: {exc.message} ({exc.reason})", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {host_error(exc).message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
