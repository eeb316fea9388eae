"""The DiskSnapshot resource."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import Condition, Model, ObjectMeta, ObjectName, StatusModel

SnapshotPhase = Literal["Pending", "Ready", "Failed", "Deleting"]


class SnapshotExport(Model):
    """Also write the snapshot out as a standalone file in this format."""

    format: Literal["qcow2", "raw"] = "qcow2"


class DiskSnapshotSpec(Model):
    disk_name: ObjectName
    export: SnapshotExport | None = None


class DiskSnapshotStatus(StatusModel):
    phase: SnapshotPhase = "Pending"
    observed_generation: int | None = None
    ready_to_use: bool = False
    snapshot_name: str | None = None
    export_path: str | None = None
    size: int | None = None
    creation_time: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class DiskSnapshot(Model):
    api_version: Literal["vmdisk.io/v1alpha1"] = "vmdisk.io/v1alpha1"
    kind: Literal["DiskSnapshot"] = "DiskSnapshot"
    metadata: ObjectMeta
    spec: DiskSnapshotSpec
    status: DiskSnapshotStatus | None = None
