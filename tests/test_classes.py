"""VMDiskClass resolution, limits and local mode, against the real file store and qemu-img.

The classes live in local mode's store (``LocalStore``): the same Lookup port
the operator serves from its kopf index.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Manifest
from vmdisk.api.vmdisk import IoTune
from vmdisk.api.vmdiskclass import ClassLimits, VMDiskClass
from vmdisk.engine.classes import resolve_class
from vmdisk.engine.limits import effective_iotune
from vmdisk.engine.reconcile import Engine
from vmdisk.errors import ClassNotFound, ExceedsClassLimit, InvalidSpec
from vmdisk.local.store import LocalStore

VMDISK = [sys.executable, "-m", "vmdisk.cli"]


def klass(name: str, backend: str = "qcow2", *, default: bool = False, **spec: Any) -> VMDiskClass:
    meta: dict[str, Any] = {"name": name}
    if default:
        meta["annotations"] = {"vmdisk.io/is-default-class": "true"}
    return VMDiskClass.model_validate({"metadata": meta, "spec": {"backend": backend, **spec}})


def blank(disk: Manifest, name: str, backend: str | None = None, **spec: Any) -> Any:
    obj = disk(name, backend or "raw", source={"blank": {}}, size="1Mi", **spec)
    if backend is None:  # the manifest names no backend: the class decides
        obj = obj.model_copy(update={"spec": obj.spec.model_copy(update={"backend": None})})
    return obj


def test_names_defaults_and_built_ins(engine: Engine, store: LocalStore, disk: Manifest) -> None:
    def resolved(obj: Any) -> tuple[str, str]:
        k = resolve_class(obj, store, engine.registry, engine.settings)
        return k.name, k.backend

    # No classes at all: the built-in class of VMDISK_DEFAULT_BACKEND, or of the backend named.
    assert resolved(blank(disk, "a")) == ("qcow2", "qcow2")
    assert resolved(blank(disk, "b", "ploop")) == ("ploop", "ploop")
    store.apply(klass("gold", "raw", default=True))
    assert resolved(blank(disk, "c")) == ("gold", "raw")
    assert resolved(blank(disk, "d", "qcow2")) == ("qcow2", "qcow2")  # default is raw: by name
    assert resolved(blank(disk, "e", className="qcow2")) == ("qcow2", "qcow2")
    store.apply(klass("silver", default=True))
    with pytest.raises(ClassNotFound, match="2 classes are marked default"):
        resolved(blank(disk, "f"))
    with pytest.raises(ClassNotFound, match="'bronze' does not exist"):
        resolved(blank(disk, "g", className="bronze"))
    with pytest.raises(InvalidSpec, match="does not match the backend of the disk's class"):
        resolved(blank(disk, "h", "raw", className="silver"))


def test_a_missing_class_is_retried_and_then_applies(
    engine: Engine, store: LocalStore, disk: Manifest
) -> None:
    obj = blank(disk, "later", className="later")
    status = engine.reconcile_disk(obj, store)
    assert (status.phase, status.conditions[-1].reason) == ("Pending", "ClassNotFound")
    assert status.pinned_class is None
    store.apply(klass("later", "raw"))
    status = engine.reconcile_disk(obj.model_copy(update={"status": status}), store)
    assert status.phase == "Ready", status.conditions
    assert status.pinned_class is not None and status.pinned_class.name == "later"
    assert status.backend == "raw" and status.format == "raw"


def test_a_pinned_disk_survives_its_class_and_keeps_its_limits(
    engine: Engine, store: LocalStore, disk: Manifest
) -> None:
    store.apply(klass("capped", "raw", limits={"maxSize": "2Mi"}))
    made = engine.reconcile_disk(blank(disk, "kept", className="capped"), store)
    assert made.phase == "Ready", made.conditions
    store.remove(klass("capped", "raw"))
    obj = blank(disk, "kept", className="capped").model_copy(update={"status": made})
    again = engine.reconcile_disk(obj, store)
    assert again.phase == "Ready" and again.path == made.path
    # The pinned limits still apply while the class is gone.
    bigger = obj.model_copy(update={"spec": obj.spec.model_copy(update={"size": "4Mi"})})
    refused = engine.reconcile_disk(bigger, store)
    assert refused.phase == "Ready"  # a VM may be using it: it stays as it was
    change = next(c for c in refused.conditions if c.type == "ChangeRefused")
    assert change.reason == "ExceedsClassLimit" and "maxSize: 2Mi" in change.message
    assert Path(str(made.path)).stat().st_size == 1024 * 1024


def test_image_sources_of_the_class(
    engine: Engine, store: LocalStore, disk: Manifest, image_dir: Path, tmp_path: Path
) -> None:
    raw = image_dir / "base.raw"
    source = {"image": {"url": raw.as_uri(), "format": "raw"}}
    # An administrator's class reads no file:// directory unless it names one ...
    store.apply(klass("closed", "raw"))
    status = engine.reconcile_disk(disk("x", "raw", source=source, className="closed"), store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "SourceNotAllowed")
    # ... and only inside the agent's own image directories.
    store.apply(klass("outside", "raw", imageSources={"fileDirs": [str(tmp_path)]}))
    status = engine.reconcile_disk(disk("y", "raw", source=source, className="outside"), store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "SourceNotAllowed")
    strict = {"fileDirs": [str(image_dir)], "requireChecksum": True}
    store.apply(klass("strict", "raw", imageSources=strict))
    status = engine.reconcile_disk(disk("z", "raw", source=source, className="strict"), store)
    assert (status.phase, status.conditions[-1].reason) == ("Failed", "SourceNotAllowed")
    assert "checksum" in status.conditions[-1].message
    store.apply(klass("open", "raw", imageSources={"fileDirs": [str(image_dir)]}))
    status = engine.reconcile_disk(disk("w", "raw", source=source, className="open"), store)
    assert status.phase == "Ready", status.conditions


@pytest.mark.parametrize(
    ("asked", "limits", "expected"),
    [
        ({}, {"totalIopsSec": 100}, {"totalIopsSec": 100}),  # nothing asked: the limit
        ({"totalIopsSec": 50}, {"totalIopsSec": 100}, {"totalIopsSec": 50}),
        (  # a split request within a total limit stays split
            {"readIopsSec": 40, "writeIopsSec": 60},
            {"totalIopsSec": 100},
            {"readIopsSec": 40, "writeIopsSec": 60},
        ),
        ({}, {"readBytesSec": 10}, {"readBytesSec": 10}),
        (
            {"readBytesSec": 5},
            {"readBytesSec": 10, "writeBytesSec": 7},
            {"readBytesSec": 5, "writeBytesSec": 7},
        ),
        ({"totalBytesSec": 9}, {}, {"totalBytesSec": 9}),  # no limits: as asked
    ],
)
def test_iotune_within_limits(
    asked: dict[str, int], limits: dict[str, int], expected: dict[str, int]
) -> None:
    result = effective_iotune(
        IoTune.model_validate(asked),
        ClassLimits.model_validate({"iotune": limits}),
        class_name="c",
    )
    assert result == IoTune.model_validate(expected)


@pytest.mark.parametrize(
    ("asked", "limits", "field"),
    [
        ({"totalIopsSec": 101}, {"totalIopsSec": 100}, "totalIopsSec"),
        ({"readIopsSec": 60, "writeIopsSec": 60}, {"totalIopsSec": 100}, "readIopsSec"),
        ({"readIopsSec": 60}, {"totalIopsSec": 100}, "readIopsSec"),
        ({"totalBytesSec": 5}, {"readBytesSec": 10}, "totalBytesSec"),
        ({"writeBytesSec": 11}, {"writeBytesSec": 10}, "writeBytesSec"),
    ],
)
def test_iotune_above_limits_is_refused(
    asked: dict[str, int], limits: dict[str, int], field: str
) -> None:
    with pytest.raises(ExceedsClassLimit, match=field):
        effective_iotune(
            IoTune.model_validate(asked),
            ClassLimits.model_validate({"iotune": limits}),
            class_name="c",
        )


def test_vmdisk_apply_get_and_delete_with_a_class(tmp_path: Path) -> None:
    manifests = tmp_path / "m.yaml"
    docs = [
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDiskClass",
            "metadata": {"name": "small", "annotations": {"vmdisk.io/is-default-class": "true"}},
            "spec": {"backend": "raw", "limits": {"maxSize": "4Mi"}},
        },
        {
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDisk",
            "metadata": {"name": "ok"},
            "spec": {"size": "2Mi", "source": {"blank": {}}},
        },
    ]
    manifests.write_text(yaml.safe_dump_all(docs))
    state = ["--state-dir", str(tmp_path / "state")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VMDISK, *args, *state], capture_output=True, text=True)

    applied = run("apply", "-f", str(manifests))
    assert applied.returncode == 0, applied.stderr
    assert "small" in applied.stdout and "ok" in applied.stdout
    listed = run("get", "vmdc")
    assert listed.stdout.split("\n")[0].split() == ["NAME", "BACKEND", "DEFAULT"]
    assert listed.stdout.split("\n")[1].split() == ["small", "raw", "true"]
    docs[1]["metadata"]["name"], docs[1]["spec"]["size"] = "big", "8Mi"
    manifests.write_text(yaml.safe_dump_all(docs))
    refused = run("apply", "-f", str(manifests))
    assert refused.returncode == 1 and "ExceedsClassLimit" in refused.stderr
    # A class whose parameters its backend does not know is refused at load, naming the field.
    docs[0]["spec"]["parameters"] = {"volumeGroup": "vg0"}
    manifests.write_text(yaml.safe_dump_all(docs))
    bad = run("apply", "-f", str(manifests))
    assert bad.returncode != 0 and "spec.parameters.volumeGroup" in bad.stderr
    assert run("delete", "vmdiskclass", "small").returncode == 0
    assert "small" not in run("get", "vmdc").stdout
