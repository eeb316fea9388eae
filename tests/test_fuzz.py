"""Property-based fuzzing: specs through the models and the planner, bytes through the inspector.

The properties: never an unhandled exception (only validation errors or the
typed VMDiskError), and never a write outside the directory we hand over.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vmdisk.api.vmdisk import VMDisk, VMDiskStatus
from vmdisk.backends.base import DiskState
from vmdisk.backends.registry import Registry
from vmdisk.config import Settings
from vmdisk.engine.classes import builtin_classes, from_class
from vmdisk.engine.planning import plan_disk
from vmdisk.errors import VMDiskError
from vmdisk.images.inspect import inspect_image

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=12),
    st.sampled_from(
        ["10Gi", "1e3", "0", "../x", "qcow2", "raw", "rbd", "virtio", "none", "x" * 300]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
spec_fields = st.fixed_dictionaries(
    {},
    optional={
        "backend": st.one_of(st.sampled_from(["raw", "qcow2", "ploop", "lvm", "rbd"]), scalars),
        "size": st.one_of(st.sampled_from(["1Gi", "512Mi", "3", "1.5Gi", "-1", "0.5"]), scalars),
        "source": st.one_of(
            st.just({"blank": {}}),
            st.just({"image": {"url": "http://h/i.qcow2", "format": "qcow2"}}),
            st.just({"disk": {"name": "other"}}),
            st.dictionaries(
                st.sampled_from(["image", "blank", "disk", "snapshot", "bogus"]),
                json_values,
                max_size=3,
            ),
        ),
        "preallocation": scalars,
        "libvirt": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "bus": st.sampled_from(["virtio", "scsi", "ide", "floppy"]),
                    "cache": st.sampled_from(["none", "writeback", "bogus"]),
                    "io": st.sampled_from(["native", "threads"]),
                    "unit": st.integers(-2, 20000),
                    "iotune": st.dictionaries(
                        st.sampled_from(["totalBytesSec", "readBytesSec", "totalIopsSec"]),
                        st.integers(-5, 2**40),
                    ),
                },
            ),
        ),
        "restore": st.one_of(st.just({"snapshot": "s1"}), json_values),
    },
)
manifests = st.builds(
    lambda name, spec: {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {"name": name},
        "spec": spec,
    },
    st.one_of(st.sampled_from(["a", "web-root", "../x", "A", ""]), st.text(max_size=10)),
    st.one_of(spec_fields, json_values),
)
host_states = st.one_of(
    st.none(),
    st.builds(
        DiskState,
        format=st.sampled_from(["raw", "qcow2"]),
        virtual_size=st.integers(0, 2**50),
        actual_size=st.integers(0, 2**50),
        restored_snapshot=st.sampled_from([None, "s1", "s2"]),
    ),
)


@settings(max_examples=400, deadline=None)
@given(manifest=manifests, host=host_states, pinned=st.sampled_from([None, "raw", "qcow2"]))
def test_specs_through_models_and_planner(manifest: dict[str, Any], host: Any, pinned: Any):
    try:
        disk = VMDisk.model_validate(manifest)
    except ValidationError as exc:
        for error in exc.errors():  # every problem names where it is
            assert error["loc"] or error["type"] == "model_type"
        return
    status = VMDiskStatus(format=pinned, backend=pinned) if pinned else None
    try:
        registry = Registry({})
        from_class(builtin_classes(registry)["qcow2"], disk, registry, Settings(node_name="n"))
        plan_disk(disk.spec, status, host)
    except VMDiskError as exc:
        assert exc.reason and exc.message


QCOW2_MAGIC = b"QFI\xfb"
headers = st.one_of(
    st.binary(max_size=4096),
    # qcow2-looking headers with arbitrary fields: backing offsets, sizes, versions.
    st.builds(
        lambda version, backing, size, rest: (
            QCOW2_MAGIC + struct.pack(">IQIIQ", version, backing, 16, 0, size) + rest
        ),
        st.sampled_from([1, 2, 3, 4, 2**31]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=1024),
    ),
    st.builds(lambda tail: b"# Disk DescriptorFile\ncreateType=" + tail, st.binary(max_size=512)),
    st.builds(lambda tail: b"KDMV" + tail, st.binary(max_size=2048)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=headers, declared=st.sampled_from([None, "raw", "qcow2"]))
def test_bytes_through_the_inspector(data: bytes, declared: str | None):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = root / "image"
        image.write_bytes(data)
        try:
            verified = inspect_image(
                image, name="fuzz", declared=declared, max_virtual_size=2**40, disk_size=None
            )
        except VMDiskError as exc:
            assert exc.permanent and exc.reason.startswith("Image")
        else:
            assert verified.format in ("raw", "qcow2")
            assert 0 < verified.virtual_size <= 2**40
        assert [p.name for p in root.iterdir()] == ["image"]  # nothing written beside it
        assert image.read_bytes() == data  # nor into it
