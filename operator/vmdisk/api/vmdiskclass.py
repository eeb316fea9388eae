"""The VMDiskClass resource: what disks of a class may touch.  No I/O.

Administrators write classes; tenants only name them (``VMDisk.spec.className``),
as with StorageClasses.  ``spec.parameters`` belongs to the class's backend and
is validated by that backend's own model (``backends/``); here it is an open
mapping so that this layer needs no backend.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .common import Model, ObjectName
from .vmdisk import BACKEND_NAME, ClassLimits, IoTuneLimits, SecretKeyRef

__all__ = [
    "DEFAULT_CLASS_ANNOTATION",
    "ClassEncryption",
    "ClassLimits",
    "ClassMeta",
    "ImageSources",
    "IoTuneLimits",
    "SecretKeyRef",
    "SecretRef",
    "VMDiskClass",
    "VMDiskClassSpec",
]

DEFAULT_CLASS_ANNOTATION = "vmdisk.io/is-default-class"

# A CIDR or a host name: checked again (ipaddress) where the policy is built.
_HOST_OR_CIDR = r"^((\*\.)?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|[0-9a-fA-F:.]+(/[0-9]{1,3})?)$"  # noqa: E501


_REGISTRY_HOST = r"^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|\[[0-9a-fA-F:.]+\])(:[0-9]{1,5})?$"  # noqa: E501


class SecretRef(Model):
    """A Secret, by name, in the agent's own namespace."""

    name: ObjectName


class ClassEncryption(Model):
    """Disks of this class are encrypted at rest with this key."""

    key_secret_ref: SecretKeyRef = Field(
        description="A key of a Secret in the agent's own namespace (never the tenant's)."
    )


class ImageSources(Model):
    """What spec.source.image of a disk of this class may read."""

    allowed_hosts: list[str] | None = Field(
        default=None,
        max_length=256,
        description="http(s) host names and CIDRs every hop (redirects too) must match; "
        "unset: any public address.",
        json_schema_extra={"items": {"type": "string", "pattern": _HOST_OR_CIDR}},
    )
    file_dirs: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="file:// roots, further bounded by the agent's VMDISK_IMAGE_DIRS.",
        json_schema_extra={"items": {"type": "string", "pattern": "^/.*", "maxLength": 4096}},
    )
    require_checksum: bool = Field(
        default=False,
        description="Refuse images without spec.source.image.checksum (an oci:// image "
        "named by @sha256 digest counts as checksummed).",
    )
    registry_credentials_ref: SecretRef | None = Field(
        default=None,
        description="A kubernetes.io/dockerconfigjson Secret in the agent's own namespace: "
        "the credentials oci:// pulls of this class log in to registries with.",
    )
    plain_http_registries: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Registries (host[:port]) this class reaches over plain http:// "
        "instead of https://.",
        json_schema_extra={
            "items": {"type": "string", "pattern": _REGISTRY_HOST, "maxLength": 261}
        },
    )


class VMDiskClassSpec(Model):
    backend: str = Field(
        pattern=BACKEND_NAME, max_length=63, description="The backend of every disk of the class."
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Placement and access, validated by the backend's own model "
        "(and bounded by the agent's settings).",
    )
    encryption: ClassEncryption | None = None
    image_sources: ImageSources = Field(default_factory=ImageSources)
    limits: ClassLimits = Field(default_factory=ClassLimits)


class ClassMeta(BaseModel):
    """Metadata of a cluster-scoped object: no namespace."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    name: ObjectName
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    creation_timestamp: str | None = Field(default=None, alias="creationTimestamp")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cluster_scoped(self) -> ClassMeta:
        if (self.model_extra or {}).get("namespace"):
            raise ValueError("VMDiskClass is cluster-scoped: metadata.namespace must not be set")
        return self


class VMDiskClass(Model):
    api_version: Literal["vmdisk.io/v1alpha1"] = "vmdisk.io/v1alpha1"
    kind: Literal["VMDiskClass"] = "VMDiskClass"
    metadata: ClassMeta
    spec: VMDiskClassSpec

    @property
    def is_default(self) -> bool:
        return self.metadata.annotations.get(DEFAULT_CLASS_ANNOTATION) == "true"
