"""CustomResourceDefinitions generated from the pydantic models.  No I/O but `write_crds`.

The models' JSON schema is rewritten into a *structural* schema, the form the
kube-apiserver demands: every ``$ref`` inlined, ``Optional[X]`` written as plain
``X`` (absent rather than null), no ``title``, no ``additionalProperties: false``
(the apiserver prunes unknown fields instead) and int-or-string fields in the
one ``anyOf`` shape it accepts.

Non-null defaults are kept.  The apiserver then stores the effective values, so
``kubectl get -o yaml`` shows what the operator will do, and the CEL rules see
the same values the models see.  They are the models' own defaults, so the two
cannot disagree.

Cross-field rules of the models are repeated as CEL ``x-kubernetes-validations``
(`RULES`), plus the transition rules only the apiserver can check: the source,
backend and (except on shared RBD storage) node are immutable and the size only
grows.  The size rules use the Kubernetes quantity library, so the CRDs need
Kubernetes 1.29 or newer (`MIN_KUBERNETES`; the chart's kubeVersion, the README and
`vmdisk crds` say the same, checked by tests/test_chart.py).

Backends are passed in (``backends/registry.PLUGINS``; this layer imports
none): their names become the ``backend`` enums, and a VMDiskClass's
``spec.parameters`` is the union of their parameter models, each backend's
fields allowed only in its own classes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel

from .common import GROUP, VERSION
from .kubernetes import MIN_KUBERNETES as MIN_KUBERNETES  # re-exported: its old home
from .snapshot import DiskSnapshotSpec, DiskSnapshotStatus
from .vmdisk import VMDiskSpec, VMDiskStatus
from .vmdiskclass import DEFAULT_CLASS_ANNOTATION, VMDiskClassSpec

Schema = dict[str, Any]


class BackendSchema(Protocol):
    """What the CRDs need to know of a backend (``backends.base.BackendPlugin``)."""

    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> type[BaseModel]: ...

    @property
    def shared(self) -> bool: ...


_HEADER = "# Generated from the pydantic models in vmdisk.api by `make crds`; do not edit.\n"
_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
_KEY_ORDER = (
    "description",
    "type",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "default",
    "anyOf",
    "x-kubernetes-int-or-string",
    "required",
    "properties",
    "additionalProperties",
    "items",
)


def _rule(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    result = {"rule": rule, "message": message}
    if field_path is not None:
        result["fieldPath"] = field_path
    return result


def _unset_or(field: str, condition: str) -> str:
    return f"(!has(self.{field}) || {condition})"


def _same(field: str) -> str:
    """CEL: an optional field is equally present, and equal, in self and oldSelf."""
    return (
        f"has(self.{field}) == has(oldSelf.{field}) && "
        f"(!has(self.{field}) || self.{field} == oldSelf.{field})"
    )


def _zero(field: str) -> str:
    return _unset_or(field, f"self.{field} == 0")


def _total_excludes_split(kind: str) -> str:
    """CEL: a total limit of `kind` (BytesSec, IopsSec) excludes read and write limits."""
    return f"{_zero('total' + kind)} || ({_zero('read' + kind)} && {_zero('write' + kind)})"


# A quantity may be an int or a string; string() maps both to the string form
# quantity() parses (string() of a string is itself).  isQuantity() guards keep a
# malformed value down to the pattern error instead of adding an evaluation error.
_QTY_SELF = "quantity(string(self))"
_SOURCES = ("image", "blank", "disk", "snapshot")

RULES: dict[str, dict[str, list[dict[str, str]]]] = {
    "VMDisk": {
        "spec": [
            _rule(_same("backend"), "backend is immutable", ".backend"),
            _rule(
                "!has(oldSelf.className) || "
                "(has(self.className) && self.className == oldSelf.className)",
                "className is immutable",
                ".className",
            ),
            _rule("!has(oldSelf.size) || has(self.size)", "size cannot be removed", ".size"),
            # No default in a cluster: a disk no agent owns would wait silently forever.
            # (Local mode's models default it to this node.)
            _rule(
                "has(self.nodeName) && self.nodeName != ''",
                "nodeName is required: the node whose vmdisk agent makes this disk",
                ".nodeName",
            ),
            _rule(
                "!has(self.source.blank) || has(self.size)",
                "size is required for a blank disk",
                ".size",
            ),
        ],
        "spec.size": [
            _rule(
                # sign() is a global function in the API server's quantity
                # library, not a method: a member call does not compile there.
                f"!isQuantity(string(self)) || {_QTY_SELF}.isGreaterThan(quantity('0'))",
                "size must be greater than zero",
            ),
            _rule(
                f"!isQuantity(string(self)) || "
                f"{_QTY_SELF}.compareTo(quantity(string(oldSelf))) >= 0",
                "size can only grow",
            ),
        ],
        "spec.source": [
            _rule(
                "[" + ", ".join(f"has(self.{s})" for s in _SOURCES) + "].filter(x, x).size() == 1",
                "exactly one of image, blank, disk, snapshot must be set",
            ),
            _rule("self == oldSelf", "source is immutable"),
        ],
        "spec.libvirt": [
            _rule(
                "!has(self.io) || self.io != 'native' || "
                + _unset_or("cache", "self.cache in ['none', 'directsync']"),
                "io: native needs cache: none or directsync (O_DIRECT)",
            ),
            _rule(
                "!has(self.unit) || (has(self.bus) && self.bus == 'scsi')",
                "unit is the SCSI unit address and needs bus: scsi",
            ),
            _rule(
                "!has(self.device) || self.device != 'lun' || "
                "(has(self.bus) && self.bus == 'scsi')",
                "device: lun needs bus: scsi",
            ),
        ],
        "spec.libvirt.iotune": [
            _rule(
                _total_excludes_split("BytesSec"),
                "totalBytesSec cannot be combined with readBytesSec/writeBytesSec",
            ),
            _rule(
                _total_excludes_split("IopsSec"),
                "totalIopsSec cannot be combined with readIopsSec/writeIopsSec",
            ),
        ],
    },
    "DiskSnapshot": {
        "spec.diskName": [_rule("self == oldSelf", "diskName is immutable")],
    },
    "VMDiskClass": {
        "spec.limits.iotune": [
            _rule(
                _total_excludes_split("BytesSec"),
                "totalBytesSec cannot be combined with readBytesSec/writeBytesSec",
            ),
            _rule(
                _total_excludes_split("IopsSec"),
                "totalIopsSec cannot be combined with readIopsSec/writeIopsSec",
            ),
        ],
    },
}


def _node_rule(backends: Sequence[BackendSchema]) -> dict[str, str]:
    shared = [b.name for b in backends if b.shared]
    listed = ", ".join(f"'{n}'" for n in shared)
    return _rule(
        f"(has(self.backend) && self.backend in [{listed}]) || ({_same('nodeName')})",
        f"nodeName is immutable unless backend names shared storage ({', '.join(shared)})",
        ".nodeName",
    )


def _parameters(backends: Sequence[BackendSchema]) -> tuple[Schema, list[dict[str, str]]]:
    """The union of the backends' parameter schemas, and rules keeping each to its backend."""
    properties: dict[str, Schema] = {}
    owners: dict[str, set[str]] = {}
    for backend in backends:
        for key, field in model_schema(backend.parameters).get("properties", {}).items():
            if key in properties and properties[key] != field:
                raise ValueError(f"backends disagree on the schema of parameter {key!r}")
            # No defaults in the union: the apiserver would put one backend's
            # defaults into every class.  Each backend's model applies its own.
            field.pop("default", None)
            properties[key] = field
            owners.setdefault(backend.name, set()).add(key)
    rules = []
    for backend in backends:
        own = owners.get(backend.name, set())
        foreign = sorted(set(properties) - own)
        if not foreign:
            continue
        absent = " && ".join(f"!has(self.parameters.{key})" for key in foreign)
        allowed = ", ".join(sorted(own)) or "none"
        rules.append(
            _rule(
                f"self.backend != '{backend.name}' || !has(self.parameters) || ({absent})",
                f"parameters of a {backend.name} class: {allowed}",
                ".parameters",
            )
        )
    schema: Schema = {
        "description": "Placement and access, validated by the backend's own model "
        "(and bounded by the agent's settings).",
        "type": "object",
        "properties": dict(sorted(properties.items())),
    }
    return schema, rules


def _sorted_keys(node: Schema) -> Schema:
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Rewrite one pydantic JSON-schema node (and its children) into structural form."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        node = {**copy.deepcopy(defs[ref.rsplit("/", 1)[-1]]), **node}
    branches = [b for b in node.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        inner = structural(branches[0], defs)
        node = {**inner, **{k: v for k, v in node.items() if k != "default" or v is not None}}
    elif branches:
        node["anyOf"] = branches
    for key in ("title", "$defs"):
        node.pop(key, None)
    if node.get("default", 0) is None:
        del node["default"]
    if node.get("additionalProperties") in (False, True):
        del node["additionalProperties"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node["anyOf"] = copy.deepcopy(_INT_OR_STRING)
    elif "anyOf" in node:
        raise ValueError(f"no structural form for a union: {node['anyOf']}")
    if "properties" in node:
        node["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = structural(node[key], defs)
    return _sorted_keys(node)


def model_schema(model: type[BaseModel]) -> Schema:
    """The structural schema of one model, as the API sees it (camelCase)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def _node(schema: Schema, path: str) -> Schema:
    for name in path.split("."):
        schema = schema["properties"][name]
    return schema


def _conditions_as_map(status: Schema) -> None:
    # Conditions are keyed by type (as metav1.Condition), which lets server-side
    # apply merge them.
    status["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )


def _crd(
    kind: str,
    plural: str,
    short_names: list[str],
    description: str,
    spec: Schema,
    status: type[BaseModel] | None,
    columns: list[dict[str, Any]],
    *,
    scope: str = "Namespaced",
    selectable: Sequence[str] = (),
) -> dict[str, Any]:
    properties: Schema = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": spec,
    }
    if status is not None:
        status_schema = model_schema(status)
        _conditions_as_map(status_schema)
        properties["status"] = status_schema
    root: Schema = {
        "description": description,
        "type": "object",
        "required": ["spec"],
        "properties": properties,
    }
    for path, rules in RULES[kind].items():
        node = _node(root, path)
        node["x-kubernetes-validations"] = node.get("x-kubernetes-validations", []) + (
            copy.deepcopy(rules)
        )
    version: Schema = {"name": VERSION, "served": True, "storage": True}
    if status is not None:
        version["subresources"] = {"status": {}}
    version["additionalPrinterColumns"] = columns
    if selectable:
        version["selectableFields"] = [{"jsonPath": path} for path in selectable]
    version["schema"] = {"openAPIV3Schema": root}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["vmdisk"],
            },
            "versions": [version],
        },
    }


def _column(name: str, path: str, type_: str = "string") -> dict[str, str]:
    return {"name": name, "type": type_, "jsonPath": path}


_AGE = _column("Age", ".metadata.creationTimestamp", "date")


def _with_rules(schema: Schema, rules: list[dict[str, str]]) -> Schema:
    schema["x-kubernetes-validations"] = schema.get("x-kubernetes-validations", []) + rules
    return _sorted_keys(schema)


def crds(
    backends: Sequence[BackendSchema], *, selectable_fields: bool = False
) -> list[dict[str, Any]]:
    """The VMDiskClass, VMDisk and DiskSnapshot CRDs (apiextensions.k8s.io/v1), for 1.29+.

    ``selectable_fields`` declares ``spec.nodeName`` selectable (Kubernetes 1.31+; a
    1.29 server refuses the field), so each agent is sent only its own node's VMDisks.
    """
    names = [b.name for b in backends]
    disk_spec = model_schema(VMDiskSpec)
    disk_spec["properties"]["backend"]["enum"] = names
    disk_spec = _with_rules(disk_spec, [_node_rule(backends)])
    class_spec = model_schema(VMDiskClassSpec)
    class_spec["properties"]["backend"]["enum"] = names
    parameters, parameter_rules = _parameters(backends)
    class_spec["properties"]["parameters"] = parameters
    class_spec = _with_rules(class_spec, parameter_rules)
    annotation = DEFAULT_CLASS_ANNOTATION.replace(".", "\\.")
    return [
        _crd(
            "VMDiskClass",
            "vmdiskclasses",
            ["vmdc"],
            "What disks of a class may touch on a node (set by administrators; "
            "VMDisks name a class).",
            class_spec,
            None,
            [
                _column("Backend", ".spec.backend"),
                _column("Default", f".metadata.annotations.{annotation}"),
                _AGE,
            ],
            scope="Cluster",
        ),
        _crd(
            "VMDisk",
            "vmdisks",
            ["vmd"],
            "A virtual machine disk, provisioned on a node by that node's vmdisk agent.",
            disk_spec,
            VMDiskStatus,
            [
                _column("Class", ".status.class.name"),
                _column("Backend", ".spec.backend"),
                _column("Size", ".spec.size"),
                _column("Node", ".spec.nodeName"),
                _column("Phase", ".status.phase"),
                _AGE,
            ],
            selectable=[".spec.nodeName"] if selectable_fields else [],
        ),
        _crd(
            "DiskSnapshot",
            "disksnapshots",
            ["dsnap"],
            "A point-in-time snapshot of a VMDisk.",
            model_schema(DiskSnapshotSpec),
            DiskSnapshotStatus,
            [
                _column("Disk", ".spec.diskName"),
                _column("Ready", ".status.readyToUse", "boolean"),
                _AGE,
            ],
        ),
    ]


class _Dumper(yaml.SafeDumper):
    """Never write anchors and aliases: kubectl accepts them, readers stumble."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml(crd: dict[str, Any]) -> str:
    """One CRD as YAML, byte-for-byte stable for a given model."""
    body = yaml.dump(crd, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)
    return _HEADER + body


def crd_filename(crd: dict[str, Any]) -> str:
    """``<plural>.<group>.yaml``, e.g. ``vmdisks.vmdisk.io.yaml``."""
    return f"{crd['metadata']['name']}.yaml"


def crds_yaml(backends: Sequence[BackendSchema]) -> str:
    """All CRDs as one multi-document YAML stream."""
    return "---\n".join(crd_yaml(crd) for crd in crds(backends))


def write_crds(
    directory: Path, backends: Sequence[BackendSchema], *, selectable_fields: bool = False
) -> list[Path]:
    """Write one file per CRD into `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for crd in crds(backends, selectable_fields=selectable_fields):
        path = directory / crd_filename(crd)
        path.write_text(crd_yaml(crd), encoding="utf-8")
        paths.append(path)
    return paths


__all__ = [
    "RULES",
    "BackendSchema",
    "crd_filename",
    "crd_yaml",
    "crds",
    "crds_yaml",
    "model_schema",
    "write_crds",
]
