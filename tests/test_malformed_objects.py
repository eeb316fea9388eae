"""Malformed objects, as an API server without admission (or a hand-written status)
delivers them to the handlers: every one parses to a clear result, none raises.

These drive the handlers' parsing functions with real kopf ``Body`` views over
raw objects; the end-to-end flow against a real kube-apiserver arrives with the
suite's API-server harness (issue 16).
"""

from __future__ import annotations

from typing import Any

import pytest
from kopf._cogs.structs.bodies import Body
from pydantic import ValidationError

from vmdisk.api.snapshot import DiskSnapshot, DiskSnapshotStatus
from vmdisk.api.vmdisk import VMDisk, VMDiskStatus
from vmdisk.operator.handlers import _clearing, parse_object, parse_status, snapshot_disk
from vmdisk.operator.metrics import Metrics, phase_and_reason

GOOD_SPEC = {"backend": "raw", "size": "1Mi", "source": {"blank": {}}}
BAD_STATUSES: list[Any] = [
    "garbage",
    {"phase": 5},
    {"conditions": "not-a-list"},
    {"conditions": [{"type": "Ready", "status": "Maybe"}]},
    {"virtualSize": {"nested": True}},
]


def _disk(status: Any, **spec: Any) -> Body:
    return Body(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDisk",
            "metadata": {"name": "d", "namespace": "vms", "generation": 2},
            "spec": {**GOOD_SPEC, **spec},
            "status": status,
        }
    )


@pytest.mark.parametrize("status", BAD_STATUSES)
def test_a_malformed_status_is_dropped_and_the_spec_still_parses(status: Any) -> None:
    body = _disk(status)
    assert parse_status(body.get("status"), VMDiskStatus) is None
    disk = parse_object(body, VMDisk, VMDiskStatus)
    assert disk.status is None and disk.spec.backend == "raw"
    # Whatever the malformed status held is removed by the next status patch.
    patch = _clearing(body.get("status"), {"phase": "Ready"})
    assert patch["phase"] == "Ready"
    if isinstance(status, dict):
        assert {k for k, v in patch.items() if v is None} == set(status) - {"phase"}


def test_a_bad_spec_is_still_a_validation_error_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="size"):
        parse_object(_disk("garbage", size=["1Gi"]), VMDisk, VMDiskStatus)


@pytest.mark.parametrize("status", BAD_STATUSES)
def test_metrics_count_a_malformed_status_as_pending(status: Any) -> None:
    metrics = Metrics("node-a")
    metrics.disk_seen("vms", "d", *phase_and_reason(status))
    assert metrics.phase_counts()["Pending"] == 1


def test_metrics_read_a_good_status() -> None:
    status = {
        "phase": "Failed",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "DiskMissing", "message": "gone"}
        ],
    }
    assert phase_and_reason(status) == ("Failed", "DiskMissing")
    assert phase_and_reason(None) == ("Pending", None)


@pytest.mark.parametrize("disk_name", [["a", "b"], {"name": "a"}, 7, None])
def test_a_snapshot_whose_disk_name_is_no_name_belongs_to_no_node(disk_name: Any) -> None:
    body = Body({"kind": "DiskSnapshot", "spec": {"diskName": disk_name}})
    key = snapshot_disk("vms", body.spec)
    assert key is None
    assert (key is not None and key in {("vms", "a"): {}}) is False


def test_a_snapshot_with_a_malformed_status_parses() -> None:
    body = Body(
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "DiskSnapshot",
            "metadata": {"name": "s", "namespace": "vms"},
            "spec": {"diskName": "d"},
            "status": {"readyToUse": "perhaps"},
        }
    )
    assert snapshot_disk("vms", body.spec) == ("vms", "d")
    snap = parse_object(body, DiskSnapshot, DiskSnapshotStatus)
    assert snap.status is None
