"""The DiskSnapshot resource."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import Condition, Model, ObjectMeta, ObjectName, StatusModel

SnapshotPhase = Literal["Pending", "Ready", "Failed", "Deleting"]
Consistency = Literal["Offline", "CrashConsistent", "Quiesced"]


class SnapshotExport(Model):
    """Also write the snapshot out as a standalone file in this format."""

    format: Literal["qcow2", "raw"] = "qcow2"
    pool: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,255}$",
        description="rbd disks only: clone the snapshot into this RBD pool and flatten it "
        "(Nova's direct snapshot); status.exportURL is its rbd:// URL. RBD images are raw: "
        "format does not apply.",
    )


class DiskSnapshotSpec(Model):
    disk_name: ObjectName
    export: SnapshotExport | None = None


class DiskSnapshotStatus(StatusModel):
    phase: SnapshotPhase = "Pending"
    observed_generation: int | None = None
    ready_to_use: bool = False
    snapshot_name: str | None = None
    export_path: str | None = None
    export_url: str | None = Field(
        default=None,
        alias="exportURL",
        description="rbd://fsid/pool/image/snap of a direct snapshot (spec.export.pool).",
    )
    size: int | None = None
    consistency: Consistency | None = Field(
        default=None,
        description="How the snapshot was taken: with the disk not in use (Offline), or under "
        "a running domain of the node's libvirtd, its guest's filesystems frozen through the "
        "guest agent (Quiesced) or not (CrashConsistent, no agent answered).",
    )
    creation_time: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class DiskSnapshot(Model):
    api_version: Literal["vmdisk.io/v1alpha1"] = "vmdisk.io/v1alpha1"
    kind: Literal["DiskSnapshot"] = "DiskSnapshot"
    metadata: ObjectMeta
    spec: DiskSnapshotSpec
    status: DiskSnapshotStatus | None = None
