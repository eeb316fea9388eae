"""The generated CRDs: in sync with crds/, structural, and agreeing with the models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pydantic
import pytest
import yaml

from schema import CRDValidationError, crd_schema, validate_against_crd
from vmdisk.api import DiskSnapshot, DiskSnapshotStatus, VMDisk, VMDiskStatus, dump
from vmdisk.api.common import Condition
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


# --- valid and invalid objects: the CRD and the models agree -------------------------


@pytest.mark.parametrize("obj", [FULL_VMDISK, BLANK, SNAPSHOT], ids=["full", "blank", "snapshot"])
def test_valid_manifests(obj: dict[str, Any]) -> None:
    defaulted = validate_against_crd(obj)
    model = _model_of(obj).model_validate(obj)
    # The apiserver's defaults are the models' defaults.
    assert _model_of(obj).model_validate(defaulted) == model


def test_defaults_are_applied() -> None:
    spec = validate_against_crd(_with(BLANK, "spec.libvirt", {"iotune": {}}))["spec"]
    assert spec["preallocation"] == "none"
    assert spec["libvirt"]["cache"] == "none"
    assert spec["libvirt"]["iotune"]["totalBytesSec"] == 0


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "two sources": (
        _with(BLANK, "spec.source.disk", {"name": "other"}),
        "spec.source: Invalid value: exactly one of",
    ),
    "no source member": (_with(BLANK, "spec.source", {}), "exactly one of"),
    "no source": (_with(BLANK, "spec.source", None), "'source' is a required property"),
    "bad backend": (_with(BLANK, "spec.backend", "Zfs"), "spec.backend: 'Zfs' does not match"),
    "bad quantity": (_with(BLANK, "spec.size", "10GB"), "spec.size: '10GB' does not match"),
    "millis": (_with(BLANK, "spec.size", "100m"), "spec.size: '100m' does not match"),
    "negative size": (_with(BLANK, "spec.size", -1), "spec.size: -1 is less than"),
    "zero size": (_with(BLANK, "spec.size", "0"), "size must be greater than zero"),
    "blank without size": (_with(BLANK, "spec.size", None), "size is required for a blank"),
    "bad disk name": (
        _with(BLANK, "spec.source", {"disk": {"name": "../x"}}),
        "spec.source.disk.name: '../x' does not match",
    ),
    "bad checksum": (
        _with(FULL_VMDISK, "spec.source.image.checksum", "md5:00"),
        "spec.source.image.checksum",
    ),
    "bad url": (_with(FULL_VMDISK, "spec.source.image.url", "ftp://x"), "url"),
    "io native with writeback": (
        _with(FULL_VMDISK, "spec.libvirt.cache", "writeback"),
        "spec.libvirt: Invalid value: io: native needs cache",
    ),
    "iotune total and read": (
        _with(FULL_VMDISK, "spec.libvirt.iotune.readBytesSec", 5),
        "spec.libvirt.iotune: Invalid value: totalBytesSec cannot be combined",
    ),
    "iotune iops": (
        _with(FULL_VMDISK, "spec.libvirt.iotune.totalIopsSec", 5),
        "totalIopsSec cannot be combined",
    ),
    "unit without scsi": (
        _with(FULL_VMDISK, "spec.libvirt.bus", "virtio"),
        "unit is the SCSI unit address",
    ),
    "lun without scsi": (
        _with(BLANK, "spec.libvirt", {"device": "lun"}),
        "device: lun needs bus: scsi",
    ),
    "bad target": (_with(BLANK, "spec.libvirt", {"target": "eth0"}), "spec.libvirt.target"),
    "snapshot without disk": (
        _with(SNAPSHOT, "spec.diskName", None),
        "'diskName' is a required property",
    ),
    "bad export format": (_with(SNAPSHOT, "spec.export.format", "vmdk"), "spec.export.format"),
}


@pytest.mark.parametrize(("obj", "expected"), INVALID.values(), ids=INVALID.keys())
def test_invalid_manifests(obj: dict[str, Any], expected: str) -> None:
    with pytest.raises(CRDValidationError) as info:
        validate_against_crd(obj)
    assert expected in str(info.value)
    # The models refuse the same object (the CRD is a second line, not a different rule).
    with pytest.raises(pydantic.ValidationError):
        _model_of(obj).model_validate(obj)


# --- transition rules: updates ---------------------------------------------------------

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
    "change libvirt": (FULL_VMDISK, _with(FULL_VMDISK, "spec.libvirt.cache", "directsync"), None),
    "restore": (FULL_VMDISK, _with(FULL_VMDISK, "spec.restore.snapshot", "snap-2"), None),
    "change snapshot disk": (
        SNAPSHOT,
        _with(SNAPSHOT, "spec.diskName", "other"),
        "spec.diskName: Invalid value: diskName is immutable",
    ),
    "change export": (SNAPSHOT, _with(SNAPSHOT, "spec.export", None), None),
}


@pytest.mark.parametrize(("old", "new", "expected"), UPDATES.values(), ids=UPDATES.keys())
def test_updates(old: dict[str, Any], new: dict[str, Any], expected: str | None) -> None:
    validate_against_crd(old)
    if expected is None:
        validate_against_crd(new, old)
        return
    validate_against_crd(new)  # fine as a new object: only the change is refused
    with pytest.raises(CRDValidationError, match=expected):
        validate_against_crd(new, old)


# --- status -----------------------------------------------------------------------------


def test_status_written_by_the_models_validates() -> None:
    ready = Condition(type="Ready", status="True", reason="Provisioned", observed_generation=3)
    status = VMDiskStatus(
        phase="Ready",
        observed_generation=3,
        node_name="node-a",
        backend="qcow2",
        format="qcow2",
        path="/var/lib/vmdisk/disks/vms/web-root/disk",
        virtual_size=10 * 2**30,
        actual_size=196608,
        base_image="sha256-abc",
        progress="100%",
        libvirt_xml="<disk type='file' device='disk'/>",
        conditions=[ready],
    )
    validate_against_crd({**FULL_VMDISK, "status": dump(status)})
    snap = DiskSnapshotStatus(phase="Ready", ready_to_use=True, size=42, conditions=[ready])
    validate_against_crd({**SNAPSHOT, "status": dump(snap)})


def test_bad_status_is_refused() -> None:
    with pytest.raises(CRDValidationError, match=r"status\.phase"):
        validate_against_crd({**BLANK, "status": {"phase": "Sleeping"}})
    with pytest.raises(CRDValidationError, match="'reason' is a required property"):
        validate_against_crd({**BLANK, "status": {"conditions": [{"type": "Ready"}]}})


def test_conditions_are_a_map_keyed_by_type() -> None:
    conditions = crd_schema("VMDisk")["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_a_cluster_refuses_a_vmdisk_without_a_node_that_local_mode_defaults() -> None:
    # No agent would ever pick it up: refused with a message naming the field and why.
    for missing in (_with(BLANK, "spec.nodeName", None), _with(BLANK, "spec.nodeName", "")):
        for old in (None, BLANK):  # created without one, or dropped later
            with pytest.raises(CRDValidationError) as info:
                validate_against_crd(missing, old)
            assert "spec.nodeName: Invalid value: nodeName is required" in str(info.value)
    # Local mode's models accept it (the runner defaults it to this node).
    assert VMDisk.model_validate(_with(BLANK, "spec.nodeName", None)).spec.node_name is None


def test_examples_validate() -> None:
    """Every VMDisk/DiskSnapshot under examples/ passes the CRD and the models; local-mode
    examples once local mode has filled in the node, as a cluster would need."""
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") in ("VMDisk", "DiskSnapshot"):
                if doc["kind"] == "VMDisk" and "nodeName" not in doc["spec"]:
                    doc = _with(doc, "spec.nodeName", "this-node")
                validate_against_crd(doc)
                _model_of(doc).model_validate(doc)


def test_every_rule_compiles_in_cel() -> None:
    # cel-python parses the same CEL grammar as cel-go; the quantity functions are
    # supplied by tests/schema.py.
    env = celpy.Environment()
    for table in RULES.values():
        for rules in table.values():
            for rule in rules:
                env.compile(rule["rule"])


# --- VMDiskClass: each backend's parameters only in its own classes ---------------------


def _class(backend: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDiskClass",
        "metadata": {"name": f"{backend}-class"},
        "spec": {"backend": backend, **spec},
    }


@pytest.mark.parametrize(
    "obj",
    [
        _class("lvm", parameters={"volumeGroup": "vg0", "thin": True}),
        _class("rbd", parameters={"pool": "vms", "user": "vmdisk", "cephConf": "/etc/ceph/c"}),
        _class("qcow2", imageSources={"allowedHosts": ["*.example.com", "10.0.0.0/8"]}),
        _class("raw", limits={"maxSize": "2Ti", "iotune": {"totalIopsSec": 100}}),
    ],
    ids=["lvm", "rbd", "qcow2", "raw"],
)
def test_valid_classes(obj: dict[str, Any]) -> None:
    defaulted = validate_against_crd(obj)
    assert VMDiskClass.model_validate(defaulted) == VMDiskClass.model_validate(obj)
    # The union schema carries no defaults: one backend's never lands in another's class.
    assert defaulted["spec"].get("parameters", {}) == obj["spec"].get("parameters", {})


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_class("lvm", parameters={"pool": "vms"}), "parameters of a lvm class"),
        (_class("rbd", parameters={"volumeGroup": "vg0"}), "parameters of a rbd class"),
        (_class("raw", parameters={"thin": True}), "parameters of a raw class: none"),
        (_class("lvm", parameters={"volumeGroup": "--select=x"}), "does not match"),
        (_class("rbd", parameters={"user": "a:b"}), "does not match"),
        (_class("zfs"), "is not one of"),
        (
            _class("raw", limits={"iotune": {"totalIopsSec": 1, "readIopsSec": 1}}),
            "totalIopsSec cannot be combined",
        ),
        ({**_class("raw"), "metadata": {"name": "Bad_Name"}}, None),
    ],
    ids=["lvm-pool", "rbd-vg", "raw-thin", "vg-option", "user-colon", "zfs", "iotune", "name"],
)
def test_invalid_classes(obj: dict[str, Any], expected: str | None) -> None:
    if expected is None:  # metadata is the apiserver's business; the model refuses it
        with pytest.raises(pydantic.ValidationError):
            VMDiskClass.model_validate(obj)
        return
    with pytest.raises(CRDValidationError) as err:
        validate_against_crd(obj)
    assert any(expected in line for line in err.value.errors), err.value.errors
