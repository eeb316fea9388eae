"""The VMDisk resource: spec and status, exactly as DESIGN.md names them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .common import (
    Condition,
    Model,
    ObjectMeta,
    ObjectName,
    Quantity,
    StatusModel,
)
from .quantity import parse_bytes

# Backend names: the registry (backends/registry.py) says which exist; the CRD
# lists them as an enum.
BACKEND_NAME = r"^[a-z][a-z0-9]*$"
ImageFormat = Literal["raw", "qcow2"]
Preallocation = Literal["none", "metadata", "falloc", "full"]
Phase = Literal["Pending", "Provisioning", "Ready", "Failed", "Deleting"]

_SHA256 = r"^sha256:[0-9a-f]{64}$"
_URL = r"^(https?|file|rbd|oci|docker)://.+"
_TARGET = r"^(vd|sd|hd|xvd)[a-z]{1,3}$"


class ImageSource(Model):
    """An image to start from; its bytes are checked before any use."""

    url: str = Field(
        pattern=_URL,
        max_length=4096,
        description="http(s)://, file:// or rbd:// URL, or a containerDisk in a registry: "
        "oci://registry[:port]/repository[:tag|@sha256:<hex>] (docker:// alike)",
    )
    checksum: str | None = Field(
        default=None,
        pattern=_SHA256,
        description="sha256:<hex> of the image file (for oci://, of the disk file in the layer)",
    )
    format: ImageFormat | None = Field(
        default=None, description="Declared format; the detected format must match it."
    )


class BlankSource(Model):
    """An empty disk, optionally holding a fresh filesystem."""

    filesystem: Literal["ext4", "ext3", "xfs"] | None = None


class DiskRef(Model):
    name: ObjectName


class Source(Model):
    """Where the disk's bytes come from: exactly one member."""

    image: ImageSource | None = None
    blank: BlankSource | None = None
    disk: DiskRef | None = None
    snapshot: DiskRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("image", "blank", "disk", "snapshot") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of image, blank, disk, snapshot must be set"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        """Name of the member that is set."""
        for key in ("image", "blank", "disk", "snapshot"):
            if getattr(self, key) is not None:
                return key
        raise AssertionError("unreachable: validated to have one member")


class IoTune(Model):
    """libvirt ``<iotune>`` limits; 0 means unlimited."""

    total_bytes_sec: int = Field(default=0, ge=0)
    read_bytes_sec: int = Field(default=0, ge=0)
    write_bytes_sec: int = Field(default=0, ge=0)
    total_iops_sec: int = Field(default=0, ge=0)
    read_iops_sec: int = Field(default=0, ge=0)
    write_iops_sec: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _total_excludes_split(self) -> IoTune:
        # libvirt refuses a total limit together with a read or write limit.
        if self.total_bytes_sec and (self.read_bytes_sec or self.write_bytes_sec):
            raise ValueError("totalBytesSec cannot be combined with readBytesSec/writeBytesSec")
        if self.total_iops_sec and (self.read_iops_sec or self.write_iops_sec):
            raise ValueError("totalIopsSec cannot be combined with readIopsSec/writeIopsSec")
        return self


class LibvirtSpec(Model):
    """How the disk appears to the guest."""

    device: Literal["disk", "cdrom", "lun"] = "disk"
    bus: Literal["virtio", "scsi", "sata", "ide", "usb"] = "virtio"
    target: str | None = Field(default=None, pattern=_TARGET)
    cache: Literal["none", "writethrough", "writeback", "directsync", "unsafe"] = "none"
    discard: Literal["unmap", "ignore"] = "unmap"
    io: Literal["native", "threads", "io_uring"] | None = None
    boot_order: int | None = Field(default=None, ge=1)
    unit: int | None = Field(default=None, ge=0, le=16383)
    iotune: IoTune = Field(default_factory=IoTune)

    @model_validator(mode="after")
    def _consistent(self) -> LibvirtSpec:
        if self.io == "native" and self.cache not in ("none", "directsync"):
            raise ValueError("io: native needs cache: none or directsync (O_DIRECT)")
        if self.unit is not None and self.bus != "scsi":
            raise ValueError("unit is the SCSI unit address and needs bus: scsi")
        if self.device == "lun" and self.bus != "scsi":
            raise ValueError("device: lun needs bus: scsi")
        return self

    @property
    def effective_io(self) -> str:
        """``native`` where O_DIRECT is in use, else ``threads`` (QEMU's rule)."""
        if self.io is not None:
            return self.io
        return "native" if self.cache in ("none", "directsync") else "threads"

    @property
    def effective_target(self) -> str:
        """The target device name, derived from the bus when not given."""
        if self.target:
            return self.target
        return {"virtio": "vda", "ide": "hda"}.get(self.bus, "sda")


class RbdOptions(Model):
    """Per-disk choices of an rbd disk; placement and access live in its class."""

    flatten: bool = Field(
        default=False,
        description="Copy a clone's parent data in so it no longer depends on the parent "
        "image's snapshot (applied once; cannot be undone).",
    )


class SecretKeyRef(Model):
    """One key of a Kubernetes Secret."""

    name: ObjectName
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class RestoreSpec(Model):
    """Roll the disk back to a DiskSnapshot; applied once per new value."""

    snapshot: ObjectName


class VMDiskSpec(Model):
    node_name: str | None = Field(default=None, max_length=253)
    class_name: ObjectName | None = Field(
        default=None, description="A VMDiskClass; the default class when omitted."
    )
    backend: str | None = Field(
        default=None, pattern=BACKEND_NAME, max_length=63, description="Must match the class's."
    )
    size: Quantity | None = None
    source: Source
    preallocation: Preallocation = "none"
    deletion_policy: Literal["Delete", "Retain"] = "Delete"
    libvirt: LibvirtSpec = Field(default_factory=LibvirtSpec)
    rbd: RbdOptions | None = None
    restore: RestoreSpec | None = None

    @model_validator(mode="after")
    def _size_rules(self) -> VMDiskSpec:
        if self.source.blank is not None and self.size is None:
            raise ValueError("size is required for a blank disk")
        if self.size is not None and self.size_bytes == 0:
            raise ValueError("size must be greater than zero")
        return self

    @property
    def size_bytes(self) -> int | None:
        """Requested virtual size in bytes, or None to use the source's size."""
        return None if self.size is None else parse_bytes(self.size)


class IoTuneLimits(IoTune):
    """The largest ``libvirt.iotune`` values a disk may ask for (0: no limit).

    A disk that asks for nothing gets the limit itself.
    """


class ClassLimits(Model):
    max_size: Quantity | None = Field(default=None, description="Largest virtual size.")
    iotune: IoTuneLimits | None = None

    @property
    def max_size_bytes(self) -> int | None:
        return None if self.max_size is None else parse_bytes(self.max_size)


class PinnedClass(StatusModel):
    """The class a disk was made with, as resolved then; later class edits do not move it."""

    name: str
    parameters: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    key_secret_ref: SecretKeyRef | None = None
    limits: ClassLimits | None = None  # apply while the class is gone


class VMDiskStatus(StatusModel):
    phase: Phase = "Pending"
    observed_generation: int | None = None
    node_name: str | None = None
    backend: str | None = None
    pinned_class: PinnedClass | None = Field(default=None, alias="class")
    format: str | None = None
    path: str | None = None
    virtual_size: int | None = None
    actual_size: int | None = None
    base_image: str | None = None
    image_digest: str | None = Field(
        default=None,
        description="The registry digest (sha256:...) an oci:// image resolved to when the "
        "disk was made; oci://registry/repository@<imageDigest> names the same image.",
    )
    progress: str | None = None
    libvirt_xml: str | None = Field(default=None, alias="libvirtXML")
    libvirt_filesystem_xml: str | None = Field(
        default=None,
        alias="libvirtFilesystemXML",
        description="A libvirt <filesystem> element mounting the disk as a container's root "
        "filesystem (Nova's libvirt_fs_info; LXC domains). Absent for network disks (rbd).",
    )
    shared: bool | None = None
    restored_snapshot: str | None = None
    parent: str | None = Field(
        default=None, description="Copy-on-write parent (rbd clones: pool/image@snap)."
    )
    resized_online: bool | None = Field(
        default=None,
        description="The last grow went through libvirt to the running domain that holds "
        "the disk (virDomainBlockResize), rather than offline.",
    )
    conditions: list[Condition] = Field(default_factory=list)


class VMDisk(Model):
    api_version: Literal["vmdisk.io/v1alpha1"] = "vmdisk.io/v1alpha1"
    kind: Literal["VMDisk"] = "VMDisk"
    metadata: ObjectMeta
    spec: VMDiskSpec
    status: VMDiskStatus | None = None
