"""The ``vmdisk`` command: local mode (apply/get/delete), cache, CRDs."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api.kubernetes import MIN_KUBERNETES
from .errors import VMDiskError
from .host.files import host_error
from .local.problems import ManifestError

# Everything else is imported by the command that needs it: start-up is paid by
# every command, and --help needs none of the models, backends or image code.
if TYPE_CHECKING:
    from .config import Settings
    from .layout import StateLayout
    from .local.documents import Document, Problem
    from .local.objectfiles import Plural
    from .local.runner import LocalRunner
    from .local.store import Stored

KIND_ALIASES: dict[str, Plural] = {  # "Plural" is a Literal of these values
    "vmdisk": "vmdisks",
    "vmdisks": "vmdisks",
    "vmd": "vmdisks",
    "disksnapshot": "disksnapshots",
    "disksnapshots": "disksnapshots",
    "dsnap": "disksnapshots",
    "vmdiskclass": "vmdiskclasses",
    "vmdiskclasses": "vmdiskclasses",
    "vmdc": "vmdiskclasses",
}


class _Version(argparse.Action):
    """``--version``, reading the installed metadata only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from . import __version__

        parser.exit(message=f"vmdisk {__version__}\n")


def _namespace_option(parser: argparse.ArgumentParser, what: str) -> None:
    """One ``-n`` for every command: the same default and the same words."""
    parser.add_argument("-n", "--namespace", metavar="NS", help=what)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="state directory [VMDISK_STATE_DIR]")
    common.add_argument("--node", help="this node's name [VMDISK_NODE_NAME, hostname]")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o", "--output", choices=("yaml", "json", "table"), default="table", help="[table]"
    )

    parser = argparse.ArgumentParser(prog="vmdisk", description=__doc__)
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, *parents: argparse.ArgumentParser) -> Any:
        return sub.add_parser(name, parents=list(parents), help=summary, description=summary)

    apply = command(
        "apply",
        "create or update objects from manifests and reconcile them on this host",
        common,
        output,
    )
    apply.add_argument(
        "-f", "--filename", type=Path, required=True, help="manifest file or directory"
    )
    _namespace_option(apply, "namespace for objects that name none (others must match) [default]")
    apply.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="disks provisioned at once (each after what it is made from) [usable CPUs]",
    )

    get = command(
        "get", "show objects and their status (disks checked against the host)", common, output
    )
    get.add_argument(
        "kind", nargs="?", default="vmdisks", choices=sorted(KIND_ALIASES), help="[vmdisks]"
    )
    get.add_argument("name", nargs="?", help="one object (in -n, [default]); all when omitted")
    _namespace_option(get, "the object's namespace [default], or the only one to list [all]")

    delete = command("delete", "delete objects and, per deletionPolicy, their data", common)
    delete.add_argument("-f", "--filename", type=Path, help="delete what these manifests name")
    delete.add_argument("kind", nargs="?", choices=sorted(KIND_ALIASES), help="kind of NAME")
    delete.add_argument("name", nargs="?", help="the object to delete")
    _namespace_option(delete, "namespace of the object [default]")

    run = command("run", "run the node agent (cluster mode)", common)
    run.add_argument(
        "--liveness", metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    run.add_argument("--workers", type=int, default=4, help="concurrent disk operations [4]")
    run.add_argument("--namespace", action="append", default=[], help="watch only these namespaces")
    run.add_argument(
        "--scan-interval", type=float, default=600.0, help="orphan scan period, seconds [600]"
    )
    run.add_argument(
        "--verify-interval",
        type=float,
        default=60.0,
        help="host check of Ready disks, seconds [60]",
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

    orphans = command("orphans", "list disk data on this host that no VMDisk owns", common)
    _namespace_option(orphans, "only this namespace [all]")
    orphans.add_argument(
        "-o", "--output", choices=("json", "table"), default="table", help="[table]"
    )

    crds = command(
        "crds",
        f"print the CustomResourceDefinitions (they need Kubernetes {MIN_KUBERNETES} or newer)",
    )
    crds.add_argument("--split", type=Path, metavar="DIR", help="write one file per CRD into DIR")
    crds.add_argument(
        "--selectable-fields",
        action="store_true",
        help="declare spec.nodeName selectable (Kubernetes 1.31+): each agent is sent only "
        "its own node's VMDisks",
    )

    cache = command("cache", "list or prune the node's image cache", common)
    cache.add_argument(
        "action", choices=("list", "prune"), help="list entries, or remove unused ones"
    )
    cache.add_argument(
        "--max-age",
        help="prune entries unused this long, with a unit: 30m, 24h, 7d [VMDISK_CACHE_MAX_AGE]",
    )
    cache.add_argument("-o", "--output", choices=("json", "table"), default="table", help="[table]")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    from .config import Settings

    return Settings.from_env(state_dir=args.state_dir, node_name=args.node)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _runner(settings: Settings, workers: int = 1) -> LocalRunner:
    from .layout import StateLayout
    from .local.runner import LocalRunner
    from .local.store import LocalStore

    # The engine is built when a disk needs it: a no-op apply never loads it.
    return LocalRunner(settings, None, LocalStore(StateLayout(settings.state_dir)), workers)


def _row(obj: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The table header and row of one object (its JSON, as ``kubectl get`` reads it)."""
    from .api.quantity import format_bytes

    meta, spec, st = obj["metadata"], obj["spec"], obj.get("status") or {}
    if obj["kind"] == "VMDiskClass":
        from .api.vmdiskclass import DEFAULT_CLASS_ANNOTATION

        default = meta.get("annotations", {}).get(DEFAULT_CLASS_ANNOTATION) == "true"
        return ["NAME", "BACKEND", "DEFAULT"], [meta["name"], spec["backend"], str(default).lower()]
    if obj["kind"] == "DiskSnapshot":
        return ["NAME", "DISK", "READY", "PHASE", "EXPORT"], [
            meta["name"],
            spec["diskName"],
            str(bool(st.get("readyToUse"))).lower(),
            st.get("phase", "Pending"),
            st.get("exportPath") or "",
        ]
    size = st.get("virtualSize")
    return ["NAME", "BACKEND", "SIZE", "PHASE", "PATH"], [
        meta["name"],
        st.get("backend") or spec.get("backend") or "",
        format_bytes(size) if size else str(spec.get("size") or ""),
        st.get("phase", "Pending"),
        st.get("path") or "",
    ]


def _table(objects: Sequence[dict[str, Any]]) -> str:
    """One table per kind, in the order the kinds first appear."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    for obj in objects:
        header, row = _row(obj)
        tables.setdefault(obj["kind"], (header, []))[1].append(row)
    if not tables:
        return "No resources found."
    out = []
    for header, rows in tables.values():
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        out.append(
            "\n".join(
                "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                for r in [header, *rows]
            )
        )
    return "\n\n".join(out)


def _dumped(objects: Sequence[Stored]) -> list[dict[str, Any]]:
    """The objects' JSON, as the API server would store them."""
    if not objects:  # the models' serialiser, only when there is something to serialise
        return []
    from .api.common import dump

    return [dump(o) for o in objects]


def _print(data: Sequence[dict[str, Any]], fmt: str) -> None:
    if fmt == "table":
        print(_table(data))
    elif fmt == "json":
        print(json.dumps(data[0] if len(data) == 1 else {"items": data}, indent=2))
    else:
        import yaml

        print(yaml.safe_dump_all(data, sort_keys=False), end="")


def _not_ready(objects: Sequence[dict[str, Any]]) -> list[str]:
    """One line per object (JSON) that is not Ready, or whose last change was refused."""
    problems = []
    for obj in objects:
        if obj["kind"] == "VMDiskClass":
            continue  # nothing to reconcile
        status, what = obj.get("status"), f"{obj['kind']}/{obj['metadata']['name']}"
        conditions = status.get("conditions", []) if status else []
        refused = [c for c in conditions if c["type"] == "ChangeRefused"]
        problems += [f"{what}: {c['reason']}: {c.get('message', '')}" for c in refused]
        ready = [c for c in conditions if c["type"] == "Ready"]
        if status and status.get("phase") == "Ready" and all(c["status"] == "True" for c in ready):
            continue
        reason = ready[0] if ready else None
        detail = f"{reason['reason']}: {reason.get('message', '')}" if reason else "not reconciled"
        problems.append(f"{what}: {detail}")
    return problems


def _cmd_apply(args: argparse.Namespace) -> int:
    from .local.documents import read_documents
    from .local.settled import unchanged_batch

    settings = _settings(args)
    documents, problems = read_documents(args.filename)
    # The documents last applied, to disks that are as they were made: known from
    # the files alone, so a no-op re-apply builds no model (the table is drawn
    # from the stored JSON; -o json and yaml print what the models serialise).
    results = (
        None
        if problems or args.output != "table"
        else unchanged_batch(documents, settings, args.namespace)
    )
    if results is None:
        results = _dumped(_apply(settings, args, documents, problems))
    _print(results, args.output)
    unready = _not_ready(results)
    for line in unready:
        print(f"error: {line}", file=sys.stderr)
    return 1 if unready else 0


def _apply(
    settings: Settings, args: argparse.Namespace, documents: list[Document], problems: list[Problem]
) -> list[Stored]:
    """Validate, store and reconcile the documents (all or nothing: ManifestError)."""
    from .local.documents import with_namespace
    from .local.manifests import validate
    from .local.objectfiles import document_digest
    from .local.runner import default_workers

    max_size, namespace = settings.max_virtual_size, args.namespace
    objects = validate(documents, problems, max_size=max_size, namespace=namespace)
    digests = [document_digest(with_namespace(doc, namespace)) for _, doc in documents]
    runner = _runner(settings, args.workers or default_workers())
    try:
        return runner.apply(objects, digests)
    finally:
        runner.close()


def _cmd_get(args: argparse.Namespace) -> int:
    from .layout import CLUSTER_SCOPE, StateLayout

    settings = _settings(args)
    layout = StateLayout(settings.state_dir)
    plural = KIND_ALIASES[args.kind]
    namespace = CLUSTER_SCOPE if plural == "vmdiskclasses" else args.namespace
    # Asked of the directory first: an empty answer needs no models and no engine.
    if args.name:
        present = layout.object_file(plural, namespace or "default", args.name).exists()
    else:
        present = layout.has_objects(plural, namespace)
    objects = _checked(settings, layout, plural, namespace, args.name) if present else []
    if args.name and not objects:
        print(f"error: {plural} {args.name!r} not found", file=sys.stderr)
        return 1
    _print(_dumped(objects), args.output)
    return 0


def _checked(
    settings: Settings, layout: StateLayout, plural: Plural, namespace: str | None, name: str | None
) -> list[Stored]:
    """The stored objects, Ready disks as the host has them now rather than as last saved.

    A disk whose stored fingerprint holds is as saved (a stat of its files);
    others get a header read through the engine, built only then.  Shared
    stores (RBD) are not asked: that would be a network call per disk.
    Nothing is written: the next apply records what changed.
    """
    from .api.vmdisk import VMDisk
    from .local.runner import LocalRunner
    from .local.store import LocalStore

    runner = LocalRunner(settings, None, LocalStore(layout))
    if name is not None:
        one = runner.store.get_recorded(plural, namespace or "default", name)
        recorded = [one] if one is not None else []
    else:
        recorded = runner.store.list_recorded(plural, namespace)
    versions = functools.cache(runner.store.class_version)  # read once each
    checked: list[Stored] = []
    try:
        for obj, fingerprint in recorded:
            status = obj.status if isinstance(obj, VMDisk) else None
            if (
                isinstance(obj, VMDisk)
                and status
                and status.phase == "Ready"
                and not status.shared
                and not runner.settled(obj, fingerprint, versions)
            ):
                fresh = runner.engine.verify_disk(obj)
                obj = obj if fresh is None else obj.model_copy(update={"status": fresh})
            checked.append(obj)
    finally:
        runner.close()
    return checked


def _cmd_delete(args: argparse.Namespace) -> int:
    from .layout import CLUSTER_SCOPE
    from .local.manifests import load

    runner = _runner(_settings(args))
    if args.filename is not None:
        objects: list[Stored] = list(load(args.filename, namespace=args.namespace))
    elif args.kind and args.name:
        plural = KIND_ALIASES[args.kind]
        namespace = CLUSTER_SCOPE if plural == "vmdiskclasses" else args.namespace
        found = runner.store.get(plural, namespace or "default", args.name)
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
        runner.close()
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_crds(args: argparse.Namespace) -> int:
    """Print (or --split into files) the CRDs; they need Kubernetes 1.29 or newer."""
    from .api.crd import crd_yaml, crds, write_crds
    from .backends.registry import PLUGINS

    selectable = args.selectable_fields
    if args.split:
        for path in write_crds(args.split, PLUGINS, selectable_fields=selectable):
            print(path)
    else:
        found = crds(PLUGINS, selectable_fields=selectable)
        print("---\n".join(crd_yaml(c) for c in found), end="")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    # Only the cache's own index and the images' headers: no engine, no models.
    from .api.quantity import format_bytes
    from .config import parse_duration
    from .images.entries import CacheEntries
    from .layout import StateLayout

    settings = _settings(args)
    layout = StateLayout(settings.state_dir)
    cache = CacheEntries(layout.cache_dir, layout.cache_tmp)
    in_use = cache.in_use((layout.disks_dir, layout.exports_dir))
    if args.action == "list":
        entries = cache.entries(in_use)
        if args.output == "json":
            fields = (
                "id",
                "format",
                "virtual_size",
                "size",
                "last_used",
                "source_url",
                "source_kind",
                "in_use",
            )
            items = [{k: getattr(e, k) for k in fields} for e in entries]
            for item in items:
                item["allocated_bytes"] = item.pop("size")
                item["path"] = str(cache.root / str(item["id"]))
            print(json.dumps({"items": items}, indent=2))
            return 0
        print(
            f"{'ID':<73} {'FORMAT':<7} {'VIRTUAL':>10} {'ALLOCATED':>10} {'IN USE':<6} "
            f"{'KIND':<11} SOURCE"
        )
        for e in entries:
            used = "yes" if e.in_use else "no"
            virtual, allocated = format_bytes(e.virtual_size), format_bytes(e.size)
            source, kind = e.source_url or "", e.source_kind or "-"
            print(
                f"{e.id:<73} {e.format:<7} {virtual:>10} {allocated:>10} {used:<6} "
                f"{kind:<11} {source}"
            )
        return 0
    max_age = parse_duration(args.max_age) if args.max_age else settings.cache_max_age
    for e in cache.prune(max_age, in_use):
        print(f"removed {e.id} ({format_bytes(e.size)} allocated)")
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
    from .engine.reconcile import Engine
    from .local.store import LocalStore

    engine = Engine.build(_settings(args))
    report = engine.layout.root / "orphans.json"
    if report.exists():
        data = json.loads(report.read_text())
        print(f"# agent scan of {data['time']} on node {data['node']}", file=sys.stderr)
        orphans = list(data["orphans"])
    else:
        owned = {
            f"{o.metadata.namespace}/{o.metadata.name}"
            for o in LocalStore(engine.layout).list_disks_everywhere()
        }
        orphans = sorted(str(ref) for ref in engine.host_disks() if str(ref) not in owned)
    shown = [r for r in orphans if args.namespace is None or r.startswith(f"{args.namespace}/")]
    if args.output == "json":
        print(json.dumps({"items": shown}, indent=2))
    else:
        for ref in shown:
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
    if args.command != "run":
        # A local command lives as long as one batch, and everything it builds (the
        # models of a thousand disks) lives until it exits, so the young generation's
        # frequent passes find nothing to free: a tenth of a no-op re-apply of 1,000.
        # mypy raises the threshold for the same reason.  The agent keeps the default.
        gc.set_threshold(10_000)
    # Without -v only errors are logged: every failure reaches the user once,
    # in the command's own summary on stderr.
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.ERROR,
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
