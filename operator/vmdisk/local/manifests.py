"""Reading manifests from files and turning validation errors into field paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..api.errors import describe_errors
from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk
from ..api.vmdiskclass import VMDiskClass
from ..backends.registry import PLUGINS_BY_NAME

Object = VMDisk | DiskSnapshot | VMDiskClass
KINDS: dict[str, type[VMDisk] | type[DiskSnapshot] | type[VMDiskClass]] = {
    "VMDisk": VMDisk,
    "DiskSnapshot": DiskSnapshot,
    "VMDiskClass": VMDiskClass,
}


class ManifestError(Exception):
    """One or more manifests are invalid; ``problems`` name file, object and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _files(target: Path) -> list[Path]:
    if target.is_dir():
        return sorted(
            p for p in target.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
        )
    return [target]


def parse(doc: Any, where: str) -> Object:
    """Validate one decoded manifest; raises ManifestError naming each bad field."""
    if not isinstance(doc, dict):
        raise ManifestError([f"{where}: not a Kubernetes object (a mapping is expected)"])
    kind = doc.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ManifestError([f"{where}: kind: expected one of {', '.join(KINDS)}, got {kind!r}"])
    name = (
        (doc.get("metadata") or {}).get("name", "?")
        if isinstance(doc.get("metadata"), dict)
        else "?"
    )
    try:
        obj = model.model_validate(doc)
        if isinstance(obj, VMDiskClass):
            _check_class(obj)
        return obj
    except ValidationError as exc:
        raise ManifestError(
            [f"{where}: {kind}/{name}: {line}" for line in describe_errors(exc)]
        ) from None
    except ValueError as exc:
        raise ManifestError([f"{where}: {kind}/{name}: {exc}"]) from None


def _check_class(obj: VMDiskClass) -> None:
    """A class's parameters, by its backend's own model (as the CRD schema does)."""
    plugin = PLUGINS_BY_NAME.get(obj.spec.backend)
    if plugin is None:
        raise ValueError(
            f"spec.backend: {obj.spec.backend!r} is not a backend "
            f"(known: {', '.join(sorted(PLUGINS_BY_NAME))})"
        )
    try:
        plugin.parameters.model_validate(obj.spec.parameters)
    except ValidationError as exc:
        lines = [f"spec.parameters.{line}" for line in describe_errors(exc)]
        raise ValueError("; ".join(lines)) from None


def load(target: Path) -> list[Object]:
    """All objects in a file or a directory of files; every problem reported at once."""
    if not target.exists():
        raise ManifestError([f"{target}: no such file or directory"])
    objects: list[Object] = []
    problems: list[str] = []
    for path in _files(target):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as exc:
            problems.append(f"{path}: invalid YAML: {exc}")
            continue
        for index, doc in enumerate(docs, start=1):
            where = f"{path}" + (f" (document {index})" if len(docs) > 1 else "")
            try:
                objects.append(parse(doc, where))
            except ManifestError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return objects
