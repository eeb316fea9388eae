"""The generated CRDs: in sync with crds/, structural, and agreeing with the models.

What the server does with them (schema, defaults, CEL rules, transitions) is
tested on the real kube-apiserver in test_crd_server.py, from the tables here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml

from vmdisk.api import DiskSnapshot, VMDisk
from vmdisk.api.crd import RULES, crd_filename, crd_yaml, crds, crds_yaml, write_crds
from vmdisk.api.vmdiskclass import VMDiskClass
from vmdisk.backends.registry import PLUGINS

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "crds"
EXAMPLES = ROOT / "examples"

FULL_VMDISK: dict[str, Any] = {
    "apiVersion": "vmdisk.io/v1alpha1",
    "kind": "VMDisk",
    "metadata": {"name": "web-root", "namespace": "vms"},
    "spec": {
        "nodeName": "node-a",
        "className": "qcow2",
        "backend": "qcow2",
        "size": "10Gi",
        "source": {
            "image": {
                "url": "https://host/img.qcow2",
                "checksum": "sha256:" + "ab" * 32,
                "format": "qcow2",
            }
        },
        "preallocation": "none",
        "deletionPolicy": "Delete",
        "libvirt": {
            "device": "disk",
            "bus": "scsi",
            "target": "sda",
            "cache": "none",
            "discard": "unmap",
            "io": "native",
            "bootOrder": 1,
            "unit": 0,
            "iotune": {"totalBytesSec": 1000, "readIopsSec": 10, "writeIopsSec": 10},
        },
        "rbd": {"flatten": True},
        "restore": {"snapshot": "snap-1"},
    },
}
BLANK: dict[str, Any] = {
    "apiVersion": "vmdisk.io/v1alpha1",
    "kind": "VMDisk",
    "metadata": {"name": "scratch"},
    "spec": {"nodeName": "node-a", "backend": "raw", "size": 1073741824, "source": {"blank": {}}},
}
SNAPSHOT: dict[str, Any] = {
    "apiVersion": "vmdisk.io/v1alpha1",
    "kind": "DiskSnapshot",
    "metadata": {"name": "snap-1", "namespace": "vms"},
    "spec": {"diskName": "web-root", "export": {"format": "raw"}},
}


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `obj` with the dotted `path` set to `value` (or removed if None)."""
    result = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = result
    for name in parents:
        node = node.setdefault(name, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return result


def _model_of(obj: dict[str, Any]) -> type[pydantic.BaseModel]:
    return VMDisk if obj["kind"] == "VMDisk" else DiskSnapshot


def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the CRD serving ``kind``."""
    (crd,) = (c for c in crds(PLUGINS) if c["spec"]["names"]["kind"] == kind)
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# --- the checked-in files ---------------------------------------------------------


@pytest.mark.parametrize("crd", crds(PLUGINS), ids=crd_filename)
def test_checked_in_crd_is_current(crd: dict[str, Any]) -> None:
    path = CRD_DIR / crd_filename(crd)
    assert path.exists(), f"{path} is missing: run `make crds`"
    assert path.read_text(encoding="utf-8") == crd_yaml(crd), (
        f"{path} differs from the models: run `make crds` and commit the result"
    )


def test_filenames_and_stream() -> None:
    assert [crd_filename(c) for c in crds(PLUGINS)] == [
        "vmdiskclasses.vmdisk.io.yaml",
        "vmdisks.vmdisk.io.yaml",
        "disksnapshots.vmdisk.io.yaml",
    ]
    docs = list(yaml.safe_load_all(crds_yaml(PLUGINS)))
    assert docs == crds(PLUGINS)


def test_write_crds(tmp_path: Path) -> None:
    paths = write_crds(tmp_path / "out", PLUGINS)
    assert [p.name for p in paths] == [crd_filename(c) for c in crds(PLUGINS)]
    for path, crd in zip(paths, crds(PLUGINS), strict=True):
        assert yaml.safe_load(path.read_text(encoding="utf-8")) == crd


def test_generation_is_deterministic() -> None:
    assert [crd_yaml(c) for c in crds(PLUGINS)] == [crd_yaml(c) for c in crds(PLUGINS)]
    assert "&id" not in crds_yaml(PLUGINS), "YAML anchors leaked into the output"


# --- shape of the CRD objects --------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
@pytest.mark.parametrize("crd", crds(PLUGINS), ids=crd_filename)
def test_crd_object_is_valid_kubernetes(crd: dict[str, Any], version: str) -> None:
    # kubernetes-validate bundles the apiextensions.k8s.io/v1 schemas: no network.
    kubernetes_validate.validate(crd, version, strict=True)


def test_names_and_printer_columns() -> None:
    klass, vmdisk, snapshot = crds(PLUGINS)
    assert klass["spec"]["names"]["shortNames"] == ["vmdc"]
    assert klass["spec"]["names"]["plural"] == "vmdiskclasses"
    assert klass["spec"]["scope"] == "Cluster"
    assert "subresources" not in klass["spec"]["versions"][0]
    assert vmdisk["spec"]["names"] == {
        "kind": "VMDisk",
        "listKind": "VMDiskList",
        "plural": "vmdisks",
        "singular": "vmdisk",
        "shortNames": ["vmd"],
        "categories": ["vmdisk"],
    }
    assert snapshot["spec"]["names"]["shortNames"] == ["dsnap"]
    assert snapshot["spec"]["names"]["plural"] == "disksnapshots"
    for crd in (vmdisk, snapshot):
        assert crd["spec"]["scope"] == "Namespaced"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}

    def columns(crd: dict[str, Any]) -> list[tuple[str, str, str]]:
        cols = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        return [(c["name"], c["jsonPath"], c["type"]) for c in cols]

    assert columns(klass) == [
        ("Backend", ".spec.backend", "string"),
        ("Default", ".metadata.annotations.vmdisk\\.io/is-default-class", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]
    assert columns(vmdisk) == [
        ("Class", ".status.class.name", "string"),
        ("Backend", ".spec.backend", "string"),
        ("Size", ".spec.size", "string"),
        ("Node", ".spec.nodeName", "string"),
        ("Phase", ".status.phase", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]
    assert columns(snapshot) == [
        ("Disk", ".spec.diskName", "string"),
        ("Ready", ".status.readyToUse", "boolean"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]


_FORBIDDEN_KEYS = {"$ref", "$defs", "title", "nullable", "const", "oneOf", "allOf", "not"}


def _walk(node: dict[str, Any], path: str) -> list[str]:
    """Departures from the apiserver's structural-schema rules, as readable lines."""
    problems = [f"{path}: has {key}" for key in _FORBIDDEN_KEYS & node.keys()]
    if node.get("x-kubernetes-int-or-string"):
        if node.get("anyOf") != [{"type": "integer"}, {"type": "string"}] or "type" in node:
            problems.append(f"{path}: int-or-string must be exactly anyOf [integer, string]")
    elif "type" not in node:
        problems.append(f"{path}: no type")
    elif "anyOf" in node:
        problems.append(f"{path}: anyOf outside int-or-string")
    if "default" in node and node["default"] is None:
        problems.append(f"{path}: default null")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: both properties and additionalProperties")
    for name, sub in node.get("properties", {}).items():
        problems += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += _walk(node[key], f"{path}.{key}")
    return problems


@pytest.mark.parametrize("kind", ["VMDiskClass", "VMDisk", "DiskSnapshot"])
def test_schema_is_structural(kind: str) -> None:
    assert _walk(crd_schema(kind), kind) == []


def test_walk_catches_what_pydantic_emits() -> None:
    raw = VMDisk.model_json_schema(by_alias=True)
    assert _walk(raw, "raw"), "the structural check should reject the raw pydantic schema"


def test_every_rule_sits_where_intended() -> None:
    for kind, table in RULES.items():
        schema = crd_schema(kind)
        for path, rules in table.items():
            node = schema
            for name in path.split("."):
                node = node["properties"][name]
            # The table's rules, after any the backends add (enum-like, generated).
            assert node["x-kubernetes-validations"][-len(rules) :] == rules


# --- objects: what the server must accept and refuse (test_crd_server.py) ---------------

# Each invalid object with the part of the real server's message that names its field.
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "two sources": (
        _with(BLANK, "spec.source.disk", {"name": "other"}),
        "spec.source: Invalid value: exactly one of",
    ),
    "no source member": (
        _with(BLANK, "spec.source", {}),
        "spec.source: Invalid value: exactly one of",
    ),
    "no source": (_with(BLANK, "spec.source", None), "spec.source: Required value"),
    "bad backend": (_with(BLANK, "spec.backend", "Zfs"), "spec.backend in body should match"),
    "bad quantity": (_with(BLANK, "spec.size", "10GB"), "spec.size in body should match"),
    "millis": (_with(BLANK, "spec.size", "100m"), "spec.size in body should match"),
    "negative size": (
        _with(BLANK, "spec.size", -1),
        "spec.size in body should be greater than or equal to",
    ),
    "zero size": (_with(BLANK, "spec.size", "0"), "size must be greater than zero"),
    "blank without size": (
        _with(BLANK, "spec.size", None),
        "spec.size: Invalid value: size is required for a blank disk",
    ),
    "bad disk name": (
        _with(BLANK, "spec.source", {"disk": {"name": "../x"}}),
        "spec.source.disk.name in body should match",
    ),
    "bad checksum": (
        _with(FULL_VMDISK, "spec.source.image.checksum", "md5:00"),
        "spec.source.image.checksum in body should match",
    ),
    "bad url": (
        _with(FULL_VMDISK, "spec.source.image.url", "ftp://x"),
        "spec.source.image.url in body should match",
    ),
    "io native with writeback": (
        _with(FULL_VMDISK, "spec.libvirt.cache", "writeback"),
        "spec.libvirt: Invalid value: io: native needs cache",
    ),
    "iotune total and read": (
        _with(FULL_VMDISK, "spec.libvirt.iotune.readBytesSec", 5),
        "spec.libvirt.iotune: Invalid value: totalBytesSec cannot",
    ),
    "iotune iops": (
        _with(FULL_VMDISK, "spec.libvirt.iotune.totalIopsSec", 5),
        "spec.libvirt.iotune: Invalid value: totalIopsSec cannot",
    ),
    "unit without scsi": (
        _with(FULL_VMDISK, "spec.libvirt.bus", "virtio"),
        "unit is the SCSI unit address and needs bus: scsi",
    ),
    "lun without scsi": (
        _with(BLANK, "spec.libvirt", {"device": "lun"}),
        "device: lun needs bus: scsi",
    ),
    "bad target": (
        _with(BLANK, "spec.libvirt", {"target": "eth0"}),
        "spec.libvirt.target in body should match",
    ),
    "snapshot without disk": (
        _with(SNAPSHOT, "spec.diskName", None),
        "spec.diskName: Required value",
    ),
    "bad export format": (
        _with(SNAPSHOT, "spec.export.format", "vmdk"),
        'spec.export.format: Unsupported value: "vmdk"',
    ),
}


@pytest.mark.parametrize("obj", [FULL_VMDISK, BLANK, SNAPSHOT], ids=["full", "blank", "snapshot"])
def test_the_models_accept_the_valid_objects(obj: dict[str, Any]) -> None:
    _model_of(obj).model_validate(obj)


@pytest.mark.parametrize(("obj", "expected"), INVALID.values(), ids=INVALID.keys())
def test_the_models_refuse_what_the_crd_refuses(obj: dict[str, Any], expected: str) -> None:
    # The CRD is a second line in front of the same rules, not a different rule.
    with pytest.raises(pydantic.ValidationError):
        _model_of(obj).model_validate(obj)


UPDATES: dict[str, tuple[dict[str, Any], dict[str, Any], str | None]] = {
    "grow": (BLANK, _with(BLANK, "spec.size", "2Gi"), None),
    "same size, other spelling": (BLANK, _with(BLANK, "spec.size", "1Gi"), None),
    "same size, int and string": (FULL_VMDISK, _with(FULL_VMDISK, "spec.size", 10 * 2**30), None),
    "set a size": (_with(FULL_VMDISK, "spec.size", None), FULL_VMDISK, None),
    "shrink": (BLANK, _with(BLANK, "spec.size", "1023Mi"), "size can only grow"),
    "shrink by a byte": (BLANK, _with(BLANK, "spec.size", 2**30 - 1), "size can only grow"),
    "drop the size": (
        _with(FULL_VMDISK, "spec.size", "1Gi"),
        _with(FULL_VMDISK, "spec.size", None),
        "spec.size: Invalid value: size cannot be removed",
    ),
    "change backend": (BLANK, _with(BLANK, "spec.backend", "qcow2"), "backend is immutable"),
    "set backend": (
        _with(BLANK, "spec.backend", None),
        BLANK,
        "spec.backend: Invalid value: backend is immutable",
    ),
    "change node": (BLANK, _with(BLANK, "spec.nodeName", "node-b"), "nodeName is immutable"),
    "move an rbd disk": (
        _with(BLANK, "spec.backend", "rbd"),
        _with(_with(BLANK, "spec.backend", "rbd"), "spec.nodeName", "node-b"),
        None,
    ),
    "change source": (
        BLANK,
        _with(BLANK, "spec.source.blank", {"filesystem": "xfs"}),
        "source is immutable",
    ),
    "change class": (
        FULL_VMDISK,
        _with(FULL_VMDISK, "spec.className", "fast"),
        "className is immutable",
    ),
    "change libvirt": (FULL_VMDISK, _with(FULL_VMDISK, "spec.libvirt.cache", "directsync"), None),
    "restore": (FULL_VMDISK, _with(FULL_VMDISK, "spec.restore.snapshot", "snap-2"), None),
    "change snapshot disk": (
        SNAPSHOT,
        _with(SNAPSHOT, "spec.diskName", "other"),
        "spec.diskName: Invalid value: diskName is immutable",
    ),
    "change export": (SNAPSHOT, _with(SNAPSHOT, "spec.export", None), None),
}


def test_conditions_are_a_map_keyed_by_type() -> None:
    conditions = crd_schema("VMDisk")["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_local_mode_defaults_the_node_a_cluster_requires() -> None:
    # The refusal is the server's (test_crd_server); the models leave it to local mode.
    assert VMDisk.model_validate(_with(BLANK, "spec.nodeName", None)).spec.node_name is None


# --- VMDiskClass: each backend's parameters only in its own classes ---------------------


def _class(backend: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDiskClass",
        "metadata": {"name": f"{backend}-class"},
        "spec": {"backend": backend, **spec},
    }


VALID_CLASSES = {
    "lvm": _class("lvm", parameters={"volumeGroup": "vg0", "thin": True}),
    "rbd": _class("rbd", parameters={"pool": "vms", "user": "vmdisk", "cephConf": "/etc/ceph/c"}),
    "qcow2": _class("qcow2", imageSources={"allowedHosts": ["*.example.com", "10.0.0.0/8"]}),
    "raw": _class("raw", limits={"maxSize": "2Ti", "iotune": {"totalIopsSec": 100}}),
}

# Each invalid class with the part of the real server's message naming its field.
INVALID_CLASSES = {
    "lvm-pool": (_class("lvm", parameters={"pool": "vms"}), "parameters of a lvm class"),
    "rbd-vg": (_class("rbd", parameters={"volumeGroup": "vg0"}), "parameters of a rbd class"),
    "raw-thin": (_class("raw", parameters={"thin": True}), "parameters of a raw class: none"),
    "vg-option": (
        _class("lvm", parameters={"volumeGroup": "--select=x"}),
        "spec.parameters.volumeGroup in body should match",
    ),
    "user-colon": (
        _class("rbd", parameters={"user": "a:b"}),
        "spec.parameters.user in body should match",
    ),
    "zfs": (_class("zfs"), 'spec.backend: Unsupported value: "zfs"'),
    "iotune": (
        _class("raw", limits={"iotune": {"totalIopsSec": 1, "readIopsSec": 1}}),
        "totalIopsSec cannot be combined",
    ),
}


@pytest.mark.parametrize("obj", VALID_CLASSES.values(), ids=VALID_CLASSES.keys())
def test_the_models_accept_the_valid_classes(obj: dict[str, Any]) -> None:
    VMDiskClass.model_validate(obj)


def test_the_models_refuse_a_class_name_kubernetes_would_refuse() -> None:
    # A class's parameters are the backend's to judge (at resolution); its name is metadata.
    with pytest.raises(pydantic.ValidationError):
        VMDiskClass.model_validate({**_class("raw"), "metadata": {"name": "Bad_Name"}})
