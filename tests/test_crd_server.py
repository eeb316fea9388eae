"""The CRDs on the real API server, at every Kubernetes version the suite builds.

Every object of test_crd.py's tables goes through the real admission chain
(``fieldValidation=Strict``, schema, defaults, CEL and transition rules) as
a server-side dry run: valid ones are accepted, invalid ones refused with a
message naming the field and the rule.  Every CEL rule of the CRDs is hit,
accepted and refused, on each version.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from apiserver import Kube
from test_crd import (
    BLANK,
    EXAMPLES,
    FULL_VMDISK,
    INVALID,
    INVALID_CLASSES,
    SNAPSHOT,
    UPDATES,
    VALID_CLASSES,
    _model_of,
    _with,
)  # fmt: skip
from vmdisk.api import DiskSnapshotStatus, VMDiskStatus, dump
from vmdisk.api.common import Condition
from vmdisk.api.crd import RULES
from vmdisk.api.vmdiskclass import VMDiskClass

Obj = dict[str, Any]

# Local mode's models default nodeName, so this refusal is the cluster's alone.
NO_NODE_REFUSED = "spec.nodeName: Invalid value: nodeName is required"


@pytest.mark.parametrize("node", [None, ""], ids=["missing", "empty"])
def test_a_vmdisk_without_a_node_is_refused(kube: Kube, node: str | None) -> None:
    with pytest.raises(Kube.Error) as info:
        kube.dry_run_create(_with(BLANK, "spec.nodeName", node))
    assert NO_NODE_REFUSED in refusal(info.value)
    # Nor can an existing disk drop its node.
    with pytest.raises(Kube.Error) as info:
        dry_run_update(kube, kube.create(BLANK), _with(BLANK, "spec.nodeName", node))
    assert "Invalid value: nodeName is required: the node whose" in refusal(info.value)


def plural(obj: Obj) -> str:
    return str(obj["kind"]).lower() + "s"


def dry_run_update(kube: Kube, created: Obj, new: Obj) -> Obj:
    """A dry-run PUT of ``new`` over ``created`` (its name and resourceVersion)."""
    body = {**copy.deepcopy(new), "metadata": {**created["metadata"]}}
    path = kube.path(plural(created), created["metadata"]["name"])
    query = [("dryRun", "All"), ("fieldValidation", "Strict")]
    return dict(kube.request("PUT", path, body, query=query))


def refusal(exc: Kube.Error) -> str:
    """The message of a 422 Invalid, the value's type (``"object": ``) left out."""
    status = json.loads(exc.body)
    assert status["code"] == 422 and status["reason"] == "Invalid", status
    return re.sub(r'Invalid value: "\w+": ', "Invalid value: ", str(status["message"]))


@pytest.mark.parametrize("obj", [FULL_VMDISK, BLANK, SNAPSHOT], ids=["full", "blank", "snapshot"])
def test_valid_objects_are_accepted_and_defaulted(kube: Kube, obj: Obj) -> None:
    stored = kube.dry_run_create(obj)
    assert stored["spec"] == {**stored["spec"], **obj["spec"]} or obj["kind"] == "VMDisk"
    if obj is BLANK:
        assert stored["spec"]["preallocation"] == "none"
        assert stored["spec"]["deletionPolicy"] == "Delete"
    # The server's defaults are the models' defaults.
    model = _model_of(obj)
    assert model.model_validate(stored).spec == model.model_validate(obj).spec  # type: ignore[attr-defined]


def test_schema_defaults_reach_nested_objects(kube: Kube) -> None:
    stored = kube.dry_run_create(_with(BLANK, "spec.libvirt", {"iotune": {}}))
    assert stored["spec"]["libvirt"]["cache"] == "none"
    assert stored["spec"]["libvirt"]["iotune"]["totalBytesSec"] == 0


def test_unknown_fields_are_refused(kube: Kube) -> None:
    with pytest.raises(Kube.Error) as info:
        kube.dry_run_create(_with(BLANK, "spec.sise", "1Gi"))
    status = json.loads(info.value.body)
    assert (
        status["code"] == 400
        and 'strict decoding error: unknown field "spec.sise"' in (status["message"])
    )


ALL_INVALID = {**INVALID, **{f"class {k}": v for k, v in INVALID_CLASSES.items()}}


@pytest.mark.parametrize("name", ALL_INVALID)
def test_invalid_objects_are_refused(kube: Kube, name: str) -> None:
    obj, expected = ALL_INVALID[name]
    with pytest.raises(Kube.Error) as info:
        kube.dry_run_create(obj)
    assert expected in refusal(info.value)


@pytest.mark.parametrize(("old", "new", "expected"), UPDATES.values(), ids=UPDATES.keys())
def test_transition_rules(kube: Kube, old: Obj, new: Obj, expected: str | None) -> None:
    created = kube.create(old)
    if expected is None:
        dry_run_update(kube, created, new)
        return
    kube.dry_run_create({**new, "metadata": {"name": "fresh"}})  # fine as a new object
    with pytest.raises(Kube.Error) as info:
        dry_run_update(kube, created, new)
    assert expected in refusal(info.value)


def test_every_cel_rule_is_hit_both_ways() -> None:
    """Each rule's message appears in a refusal above, and some valid object passes it."""
    messages = [
        rule["message"] for table in RULES.values() for rules in table.values() for rule in rules
    ]
    refusals = [
        *(e for _, e in INVALID.values()),
        *(e for _, e in INVALID_CLASSES.values()),
        NO_NODE_REFUSED,
        *(e for _, _, e in UPDATES.values() if e),
    ]
    hit = [r.rpartition("Invalid value: ")[2] for r in refusals]
    missing = [m for m in messages if not any(h and h in m for h in hit)]
    assert missing == []


def _status_put(kube: Kube, obj: Obj, status: Obj) -> Obj:
    """A dry-run write of ``status`` through the status subresource of ``obj`` (created)."""
    created = kube.create(obj)
    path = kube.path(plural(obj), created["metadata"]["name"]) + "/status"
    query = [("dryRun", "All"), ("fieldValidation", "Strict")]
    return dict(kube.request("PUT", path, {**created, "status": status}, query=query))


def test_status_written_by_the_models_is_accepted(kube: Kube) -> None:
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
    stored = _status_put(kube, FULL_VMDISK, dump(status))
    assert VMDiskStatus.model_validate(stored["status"]) == status
    snap = DiskSnapshotStatus(phase="Ready", ready_to_use=True, size=42, conditions=[ready])
    stored = _status_put(kube, SNAPSHOT, dump(snap))
    assert DiskSnapshotStatus.model_validate(stored["status"]) == snap


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        # The status subresource names fields from status down.
        ({"phase": "Sleeping"}, 'phase: Unsupported value: "Sleeping"'),
        ({"conditions": [{"type": "Ready"}]}, "conditions[0].reason: Required value"),
    ],
    ids=["phase", "condition-reason"],
)
def test_a_bad_status_is_refused(kube: Kube, status: Obj, expected: str) -> None:
    with pytest.raises(Kube.Error) as info:
        _status_put(kube, BLANK, status)
    assert expected in refusal(info.value)


@pytest.mark.parametrize("obj", VALID_CLASSES.values(), ids=VALID_CLASSES.keys())
def test_valid_classes_are_accepted_as_written(kube: Kube, obj: Obj) -> None:
    stored = kube.dry_run_create(obj)
    assert VMDiskClass.model_validate(stored).spec == VMDiskClass.model_validate(obj).spec
    # The union schema carries no defaults: one backend's never lands in another's class.
    assert stored["spec"].get("parameters", {}) == obj["spec"].get("parameters", {})


def test_every_example_is_accepted(kube: Kube) -> None:
    """examples/ as a cluster would take them (local-mode VMDisks once the node is filled in)."""
    seen = 0
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not isinstance(doc, dict):
                continue
            if doc["kind"] == "VMDisk" and "nodeName" not in doc["spec"]:
                doc = _with(doc, "spec.nodeName", "this-node")  # as local mode does
            kube.dry_run_create(doc)
            seen += 1
    assert seen >= 10
