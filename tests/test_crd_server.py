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

from apiserver import Kube
from test_crd import BLANK, FULL_VMDISK, INVALID, SNAPSHOT, UPDATES, _with
from vmdisk.api.crd import RULES

Obj = dict[str, Any]

# What the real server says for each of test_crd.INVALID's objects.
REFUSED = {
    "two sources": "spec.source: Invalid value: exactly one of",
    "no source member": "spec.source: Invalid value: exactly one of",
    "no source": "spec.source: Required value",
    "bad backend": "spec.backend in body should match",
    "bad quantity": "spec.size in body should match",
    "millis": "spec.size in body should match",
    "negative size": "spec.size in body should be greater than or equal to",
    "zero size": "size must be greater than zero",
    "blank without size": "spec.size: Invalid value: size is required for a blank disk",
    "bad disk name": "spec.source.disk.name in body should match",
    "bad checksum": "spec.source.image.checksum in body should match",
    "bad url": "spec.source.image.url in body should match",
    "io native with writeback": "spec.libvirt: Invalid value: io: native needs cache",
    "iotune total and read": "spec.libvirt.iotune: Invalid value: totalBytesSec cannot",
    "iotune iops": "spec.libvirt.iotune: Invalid value: totalIopsSec cannot",
    "unit without scsi": "unit is the SCSI unit address and needs bus: scsi",
    "lun without scsi": "device: lun needs bus: scsi",
    "bad target": "spec.libvirt.target in body should match",
    "snapshot without disk": "spec.diskName: Required value",
    "bad export format": 'spec.export.format: Unsupported value: "vmdk"',
}


# Local mode's models default nodeName, so this refusal is the cluster's alone.
NO_NODE_REFUSED = "spec.nodeName: Invalid value: nodeName is required"


def test_a_vmdisk_without_a_node_is_refused(kube: Kube) -> None:
    with pytest.raises(Kube.Error) as info:
        dry_run_create(kube, _with(BLANK, "spec.nodeName", None))
    assert NO_NODE_REFUSED in refusal(info.value)


# Rules test_crd.UPDATES does not reach.
MORE_UPDATES = {
    "change class": (
        FULL_VMDISK,
        _with(FULL_VMDISK, "spec.className", "fast"),
        "className is immutable",
    ),
}
ALL_UPDATES = {**UPDATES, **MORE_UPDATES}


def plural(obj: Obj) -> str:
    return str(obj["kind"]).lower() + "s"


def dry_run_create(kube: Kube, obj: Obj) -> Obj:
    body = copy.deepcopy(obj)
    body["metadata"]["namespace"] = kube.namespace
    query = [("dryRun", "All"), ("fieldValidation", "Strict")]
    return dict(kube.request("POST", kube.path(plural(obj)), body, query=query))


def refusal(exc: Kube.Error) -> str:
    """The message of a 422 Invalid, the value's type (``"object": ``) left out."""
    status = json.loads(exc.body)
    assert status["code"] == 422 and status["reason"] == "Invalid", status
    return re.sub(r'Invalid value: "\w+": ', "Invalid value: ", str(status["message"]))


def test_every_invalid_object_has_a_server_message() -> None:
    assert set(REFUSED) == set(INVALID)


@pytest.mark.parametrize("obj", [FULL_VMDISK, BLANK, SNAPSHOT], ids=["full", "blank", "snapshot"])
def test_valid_objects_are_accepted_and_defaulted(kube: Kube, obj: Obj) -> None:
    stored = dry_run_create(kube, obj)
    assert stored["spec"] == {**stored["spec"], **obj["spec"]} or obj["kind"] == "VMDisk"
    if obj is BLANK:
        assert stored["spec"]["preallocation"] == "none"
        assert stored["spec"]["deletionPolicy"] == "Delete"


def test_schema_defaults_reach_nested_objects(kube: Kube) -> None:
    stored = dry_run_create(kube, _with(BLANK, "spec.libvirt", {"iotune": {}}))
    assert stored["spec"]["libvirt"]["cache"] == "none"
    assert stored["spec"]["libvirt"]["iotune"]["totalBytesSec"] == 0


def test_unknown_fields_are_refused(kube: Kube) -> None:
    with pytest.raises(Kube.Error) as info:
        dry_run_create(kube, _with(BLANK, "spec.sise", "1Gi"))
    status = json.loads(info.value.body)
    assert (
        status["code"] == 400
        and 'strict decoding error: unknown field "spec.sise"' in (status["message"])
    )


@pytest.mark.parametrize("name", INVALID)
def test_invalid_objects_are_refused(kube: Kube, name: str) -> None:
    obj, _ = INVALID[name]
    with pytest.raises(Kube.Error) as info:
        dry_run_create(kube, obj)
    assert REFUSED[name] in refusal(info.value)


@pytest.mark.parametrize(("old", "new", "expected"), ALL_UPDATES.values(), ids=ALL_UPDATES.keys())
def test_transition_rules(kube: Kube, old: Obj, new: Obj, expected: str | None) -> None:
    created = kube.create(old)
    body = copy.deepcopy(new)
    body["metadata"] = {**created["metadata"]}  # same name and resourceVersion: a PUT
    path = kube.path(plural(old), created["metadata"]["name"])
    query = [("dryRun", "All"), ("fieldValidation", "Strict")]
    if expected is None:
        kube.request("PUT", path, body, query=query)
        return
    dry_run_create(kube, {**new, "metadata": {"name": "fresh"}})  # fine as a new object
    with pytest.raises(Kube.Error) as info:
        kube.request("PUT", path, body, query=query)
    assert expected in refusal(info.value)


def test_every_cel_rule_is_hit_both_ways() -> None:
    """Each rule's message appears in a refusal above, and some valid object passes it."""
    messages = [
        rule["message"] for table in RULES.values() for rules in table.values() for rule in rules
    ]
    refusals = [
        *REFUSED.values(),
        NO_NODE_REFUSED,
        *(e for _, _, e in ALL_UPDATES.values() if e),
    ]
    hit = [r.rpartition("Invalid value: ")[2] for r in refusals]
    missing = [m for m in messages if not any(h and h in m for h in hit)]
    assert missing == []
