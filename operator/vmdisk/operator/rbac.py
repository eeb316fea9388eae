"""The RBAC rules the node agent needs, derived from what it actually calls.

Two sources, nothing hand-kept beside them:

* kopf's calls follow from the handler registry and the kopf settings:
  every resource with a handler or index is listed and watched; resources
  whose handlers change them are patched (finalizers, progress annotations)
  with their status subresource; Events are created when posting is on;
  CustomResourceDefinitions are listed and watched while scanning is on, and
  Namespaces too when the agent watches chosen namespaces.
* our own client's calls (`KubeApi`) are recorded: the client is run against
  a recorder, the same calls the agent makes, and each request is turned
  into a verb on a resource the way the API server does.

Secrets are the one namespaced grant: the agent reads the keys classes name
from its own namespace only, through a Role there (`namespaced_rules()`);
everything else is the ClusterRole (`cluster_rules()`).  The chart's roles
are checked against these by the tests, and the requests a running agent
makes against the integration harness are checked against them too.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from contextlib import suppress
from typing import Any, NamedTuple

import kopf
import yaml

from ..config import Settings
from ..engine.reconcile import Engine
from ..host.secrets import SecretMissing
from .kubeapi import ApiConnection, KubeApi
from .main import build_registry, operator_settings
from .metrics import Metrics, track_phases


class Permission(NamedTuple):
    group: str  # "" for the core API
    resource: str  # plural, or plural/subresource
    verb: str


def _watched(registry: kopf.OperatorRegistry) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(group, plural) of every resource with handlers, and of those whose handlers patch."""
    reading: list[Any] = [
        *registry._indexing.get_all_handlers(),
        *registry._watching.get_all_handlers(),
    ]
    writing: list[Any] = [
        *registry._changing.get_all_handlers(),
        *registry._spawning.get_all_handlers(),
    ]
    watched = {_resource(h.selector) for h in [*reading, *writing]}
    patched = {_resource(h.selector) for h in writing}
    return watched, patched


def _resource(selector: Any) -> tuple[str, str]:
    # Our handlers name resources by their plural (kopf keeps it as any_name).
    return selector.group or "", selector.plural or selector.any_name


def kopf_permissions(
    registry: kopf.OperatorRegistry, settings: kopf.OperatorSettings, *, clusterwide: bool
) -> set[Permission]:
    """What kopf itself calls for this registry and these settings."""
    watched, patched = _watched(registry)
    found = {Permission(g, p, v) for g, p in watched for v in ("list", "watch")}
    found |= {Permission(g, p, "patch") for g, p in patched}
    found |= {Permission(g, f"{p}/status", "patch") for g, p in patched}
    if settings.posting.enabled:
        found.add(Permission("", "events", "create"))
    if not settings.scanning.disabled:
        found |= {
            Permission("apiextensions.k8s.io", "customresourcedefinitions", v)
            for v in ("list", "watch")
        }
        if not clusterwide:
            found |= {Permission("", "namespaces", v) for v in ("list", "watch")}
    if not settings.peering.standalone:
        raise ValueError("peering needs kopfpeerings rules; the agent runs standalone")
    return found


class _Recorder(KubeApi):
    def __init__(self) -> None:
        super().__init__(ApiConnection(server="http://recorder"))
        self.requests: list[tuple[str, str]] = []

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> Any:
        self.requests.append((method, path.partition("?")[0]))
        return None


def client_permissions(patched: Iterable[str]) -> set[Permission]:
    """What our own client calls: status progress, the orphan scan's list, Node events, Secrets."""
    api = _Recorder()
    for plural in patched:
        api.patch_status(plural, "ns", "name", {})
    api.list_objects("vmdisks")  # OrphanScanner.scan
    api.node_event("node", "Warning", "OrphanDisk", "")
    with suppress(SecretMissing):  # the recorder answers nothing
        api.secret_value("ns", "name", "key")  # ApiSecrets: keys named by classes
    return {permission_of(method, path) for method, path in api.requests}


def permission_of(method: str, path: str) -> Permission:
    """The RBAC verb and resource of one API request, as the API server decides it."""
    parts = [p for p in path.split("/") if p]
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {
        "GET": "get" if named else "list",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }[method]
    return Permission(group, resource, verb)


def agent_registry(settings: Settings) -> kopf.OperatorRegistry:
    """The registry `vmdisk run` builds, metrics included (no I/O)."""
    engine = Engine.build(settings)
    registry = build_registry(engine, scan_interval=600.0, verify_interval=60.0)
    track_phases(registry, Metrics(settings.node_name))
    return registry


def permissions(*, clusterwide: bool = True) -> set[Permission]:
    """Everything the agent calls in the API."""
    settings = Settings(node_name="node")
    registry = agent_registry(settings)
    _, patched = _watched(registry)
    found = kopf_permissions(
        registry, operator_settings(settings.node_name, workers=1), clusterwide=clusterwide
    )
    return found | client_permissions(plural for _, plural in patched)


# Granted by a Role in the agent's namespace, never cluster-wide.
NAMESPACED = frozenset({("", "secrets")})


def _namespaced(p: Permission) -> bool:
    return (p.group, p.resource) in NAMESPACED


def cluster_rules() -> list[dict[str, list[str]]]:
    """The ClusterRole's rules: everything but what the agent reads in its own namespace."""
    return rules(p for p in permissions() if not _namespaced(p))


def namespaced_rules() -> list[dict[str, list[str]]]:
    """The Role's rules in the agent's namespace: reading class keys (Secrets)."""
    return rules(p for p in permissions() if _namespaced(p))


def rules(found: Iterable[Permission] | None = None) -> list[dict[str, list[str]]]:
    """RBAC rules: one per API group and set of verbs, sorted."""
    verbs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for p in permissions() if found is None else found:
        verbs[(p.group, p.resource)].add(p.verb)
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for (group, resource), vs in verbs.items():
        grouped[(group, tuple(sorted(vs)))].append(resource)
    return [
        {"apiGroups": [group], "resources": sorted(resources), "verbs": list(vs)}
        for (group, vs), resources in sorted(grouped.items())
    ]


if __name__ == "__main__":  # python -m vmdisk.operator.rbac: print the rules
    yaml.safe_dump(
        {"clusterRole": cluster_rules(), "role": namespaced_rules()}, sys.stdout, sort_keys=False
    )
