"""Shared model pieces: base config, object metadata, conditions."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .quantity import QUANTITY_PATTERN, parse_bytes

GROUP = "vmdisk.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _object_name(value: str) -> str:
    # Names become path components: the Kubernetes rules also keep them safe
    # there ("..", "/" and empty names cannot pass).
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters"
        )
    return value


def _namespace(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid namespace: lowercase letters, digits and '-', "
            "at most 63 characters"
        )
    return value


def _quantity(value: str | int) -> str | int:
    parse_bytes(value)
    return value


# The json_schema_extra below only feeds the generated CRD (api/crd.py); the
# validators above remain the source of truth for the models themselves.
ObjectName = Annotated[
    str,
    AfterValidator(_object_name),
    Field(json_schema_extra={"pattern": _DNS_SUBDOMAIN.pattern, "maxLength": 253}),
]
Namespace = Annotated[str, AfterValidator(_namespace)]
Quantity = Annotated[
    str | int,
    AfterValidator(_quantity),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            # Applies to the string form only; RE2 (the apiserver) has no named groups.
            "pattern": re.sub(r"\?P<\w+>", "", QUANTITY_PATTERN),
            "minimum": 0,
        }
    ),
]


class Model(BaseModel):
    """Strict camelCase model: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class StatusModel(BaseModel):
    """Status is written by us; tolerate fields a newer version may have added."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata we read; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: ObjectName
    namespace: Namespace = "default"
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)


ConditionStatus = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    """The current time as Kubernetes writes timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Condition(StatusModel):
    """One Kubernetes-convention condition."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: str = Field(default_factory=now_rfc3339)
    observed_generation: int | None = None


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """Replace the condition of the same type, keeping its transition time if unchanged."""
    result: list[Condition] = []
    for old in conditions:
        if old.type != new.type:
            result.append(old)
        elif old.status == new.status:
            new = new.model_copy(update={"last_transition_time": old.last_transition_time})
    result.append(new)
    return sorted(result, key=lambda c: c.type)


def dump(model: BaseModel) -> dict[str, Any]:
    """Serialise a model the way the Kubernetes API stores it (camelCase, no nulls)."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
