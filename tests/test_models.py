"""The pydantic models: quantities, names, cross-field rules, error paths."""

from __future__ import annotations

import re
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmdisk.api import DiskSnapshot, VMDisk, dump, format_bytes, parse_bytes
from vmdisk.api.crd import crds
from vmdisk.backends.registry import PLUGINS

GI = 2**30


def _disk(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": "d", "namespace": "vms"},
        "spec": {"size": "1Gi", "source": {"blank": {}}, **spec},
    }


def _errors(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted location, message) of every error the VMDisk model reports."""
    with pytest.raises(pydantic.ValidationError) as info:
        VMDisk.model_validate(obj)
    return [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in info.value.errors()]


# --- quantities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10Gi", 10 * GI),
        ("512Mi", 512 * 2**20),
        ("1G", 10**9),
        ("1k", 1000),
        ("1.5Gi", 3 * GI // 2),
        ("0.5Ki", 512),
        (".5Ki", 512),
        ("1e3", 1000),
        ("1E3", 1000),
        ("2e+2", 200),
        ("0", 0),
        ("7", 7),
        (" 3Mi ", 3 * 2**20),
        ("8Ei", 8 * 2**60),
        ("1e30", 10**30),
        (12345, 12345),
    ],
)
def test_parse_bytes_exact(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0.5", "whole number"),
        ("100m", "invalid quantity"),
        ("1.0001k", "whole number"),
        ("1e-1", "whole number"),
        ("-1", "invalid quantity"),
        (-1, "negative"),
        ("10GB", "invalid quantity"),
        ("10 Gi", "invalid quantity"),
        ("", "invalid quantity"),
        ("Gi", "invalid quantity"),
        ("1e31", "out of range"),
        ("1e99999999", "out of range"),
        (True, "boolean"),
    ],
)
def test_parse_bytes_rejects(text: str | int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (1, "1"), (1024, "1Ki"), (1536, "1536"), (10 * GI, "10Gi"), (2**60, "1Ei")],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


@given(st.integers(min_value=0, max_value=2**90))
def test_format_then_parse_is_identity(size: int) -> None:
    assert parse_bytes(format_bytes(size)) == size


_QUANTITY_ALPHABET = st.sampled_from([*"0123456789.eE+-kMGTPEKimn ", "Ki", "Mi", "Gi"])


@given(st.one_of(st.text(), st.lists(_QUANTITY_ALPHABET, max_size=12).map("".join)))
def test_parse_bytes_fails_only_with_value_error(text: str) -> None:
    try:
        size = parse_bytes(text)
    except ValueError:
        return
    assert size >= 0
    # Whatever the model accepts (unpadded), the CRD's pattern accepts too.
    if text == text.strip():
        assert re.fullmatch(_crd_size_pattern(), text), text


def _crd_size_pattern() -> str:
    schema = crds(PLUGINS)[1]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    pattern: str = schema["properties"]["spec"]["properties"]["size"]["pattern"]
    return pattern


def test_size_zero_rejected() -> None:
    assert _errors(_disk(size=0)) == [("spec", "Value error, size must be greater than zero")]


def test_size_bytes() -> None:
    assert VMDisk.model_validate(_disk(size="1.5Gi")).spec.size_bytes == 3 * GI // 2
    clone = VMDisk.model_validate(_disk(size=None, source={"disk": {"name": "x"}}))
    assert clone.spec.size_bytes is None


# --- structure and error paths ------------------------------------------------------


def test_two_sources_error_at_spec_source() -> None:
    errors = _errors(_disk(source={"blank": {}, "disk": {"name": "other"}}))
    assert errors == [
        (
            "spec.source",
            "Value error, exactly one of image, blank, disk, snapshot must be set"
            " (got blank, disk)",
        )
    ]


def test_no_source_member_error_at_spec_source() -> None:
    [(loc, msg)] = _errors(_disk(source={}))
    assert loc == "spec.source"
    assert "exactly one of" in msg


def test_unknown_field_is_an_error_with_its_path() -> None:
    assert _errors(_disk(libvirt={"bux": "virtio"})) == [
        ("spec.libvirt.bux", "Extra inputs are not permitted")
    ]


@pytest.mark.parametrize("name", ["../x", "A", "a/b", "", "-a", "a-", "a" * 254, "a..b"])
def test_bad_names_rejected(name: str) -> None:
    [(loc, msg)] = _errors({**_disk(), "metadata": {"name": name}})
    assert loc == "metadata.name"
    assert "not a valid name" in msg
    [(loc, _)] = _errors(_disk(source={"disk": {"name": name}}))
    assert loc == "spec.source.disk.name"


@pytest.mark.parametrize("name", ["a", "web-root", "a.b-c", "0", "a" * 253])
def test_good_names_accepted(name: str) -> None:
    assert VMDisk.model_validate({**_disk(), "metadata": {"name": name}}).metadata.name == name


def test_bad_namespace_rejected() -> None:
    [(loc, _)] = _errors({**_disk(), "metadata": {"name": "a", "namespace": "a.b"}})
    assert loc == "metadata.namespace"


def test_io_native_needs_direct_cache() -> None:
    [(loc, msg)] = _errors(_disk(libvirt={"io": "native", "cache": "writeback"}))
    assert loc == "spec.libvirt"
    assert "io: native needs cache: none or directsync" in msg
    assert VMDisk.model_validate(_disk(libvirt={"io": "native", "cache": "directsync"}))


@pytest.mark.parametrize(
    ("iotune", "message"),
    [
        ({"totalBytesSec": 1, "readBytesSec": 1}, "totalBytesSec cannot be combined"),
        ({"totalBytesSec": 1, "writeBytesSec": 1}, "totalBytesSec cannot be combined"),
        ({"totalIopsSec": 1, "readIopsSec": 1}, "totalIopsSec cannot be combined"),
    ],
)
def test_iotune_total_excludes_read_write(iotune: dict[str, int], message: str) -> None:
    [(loc, msg)] = _errors(_disk(libvirt={"iotune": iotune}))
    assert loc == "spec.libvirt.iotune"
    assert message in msg


def test_iotune_split_limits_without_total_are_fine() -> None:
    disk = VMDisk.model_validate(_disk(libvirt={"iotune": {"readBytesSec": 1, "writeIopsSec": 2}}))
    assert disk.spec.libvirt.iotune.read_bytes_sec == 1


def test_iotune_negative_rejected() -> None:
    [(loc, _)] = _errors(_disk(libvirt={"iotune": {"readBytesSec": -1}}))
    assert loc == "spec.libvirt.iotune.readBytesSec"


def test_blank_needs_size() -> None:
    assert _errors(_disk(size=None)) == [("spec", "Value error, size is required for a blank disk")]


def test_scsi_only_fields() -> None:
    [(_, msg)] = _errors(_disk(libvirt={"unit": 1}))
    assert "needs bus: scsi" in msg
    [(_, msg)] = _errors(_disk(libvirt={"device": "lun"}))
    assert "needs bus: scsi" in msg


# --- round trips --------------------------------------------------------------------

FULL: dict[str, Any] = _disk(
    nodeName="node-a",
    backend="rbd",
    size=10 * GI,
    source={
        "image": {"url": "https://h/i.qcow2", "checksum": "sha256:" + "0" * 64, "format": "qcow2"}
    },
    preallocation="falloc",
    deletionPolicy="Retain",
    libvirt={"bus": "scsi", "unit": 2, "device": "lun", "iotune": {"totalIopsSec": 9}},
    className="ceph-fast",
    rbd={"flatten": True},
    restore={"snapshot": "s"},
)


@pytest.mark.parametrize("obj", [_disk(), FULL], ids=["minimal", "full"])
def test_vmdisk_round_trip(obj: dict[str, Any]) -> None:
    disk = VMDisk.model_validate(obj)
    dumped = dump(disk)
    assert VMDisk.model_validate(dumped) == disk
    assert dumped["spec"]["source"] == obj["spec"]["source"]


def test_aliases_in_dump() -> None:
    spec = dump(VMDisk.model_validate(FULL))["spec"]
    assert spec["className"] == "ceph-fast" and spec["rbd"]["flatten"] is True
    assert spec["deletionPolicy"] == "Retain"
    assert spec["libvirt"]["iotune"]["totalIopsSec"] == 9


def test_snapshot_round_trip() -> None:
    obj = {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "DiskSnapshot",
        "metadata": {"name": "s", "namespace": "vms"},
        "spec": {"diskName": "d", "export": {"format": "raw"}},
    }
    snap = DiskSnapshot.model_validate(obj)
    assert DiskSnapshot.model_validate(dump(snap)) == snap
    with pytest.raises(pydantic.ValidationError):
        DiskSnapshot.model_validate({**obj, "spec": {"diskName": "../d"}})
