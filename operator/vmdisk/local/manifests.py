"""Manifests validated into objects, every bad field named (the documents are ``documents``')."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..api.errors import describe_errors
from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk
from ..api.vmdiskclass import VMDiskClass
from .documents import Document, Problem, read_documents, with_namespace
from .problems import ManifestError

__all__ = ["ManifestError", "load", "validate"]
Object = VMDisk | DiskSnapshot | VMDiskClass
KINDS: dict[str, type[VMDisk] | type[DiskSnapshot] | type[VMDiskClass]] = {
    "VMDisk": VMDisk,
    "DiskSnapshot": DiskSnapshot,
    "VMDiskClass": VMDiskClass,
}


def parse(
    doc: Any, where: str, *, max_size: int | None = None, namespace: str | None = None
) -> Object:
    """Validate one decoded manifest; raises ManifestError naming each bad field.

    ``max_size`` is the node's largest disk (Settings.max_virtual_size).
    ``namespace`` (``apply -n``) is given to objects without one and must match
    the others', as ``kubectl apply -n`` does.
    """
    if not isinstance(doc, dict):
        raise ManifestError([f"{where}: not a Kubernetes object (a mapping is expected)"])
    kind = doc.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ManifestError([f"{where}: kind: expected one of {', '.join(KINDS)}, got {kind!r}"])
    namespaced = model is not VMDiskClass  # classes are cluster-scoped: -n is not theirs
    if namespace is not None and namespaced and isinstance(doc.get("metadata"), dict):
        given = doc["metadata"].get("namespace")
        if given is not None and given != namespace:
            raise ManifestError(
                [f"{where}: metadata.namespace: {given!r} does not match -n {namespace!r}"]
            )
    doc = with_namespace(doc, namespace)
    name = (
        (doc.get("metadata") or {}).get("name", "?")
        if isinstance(doc.get("metadata"), dict)
        else "?"
    )
    try:
        obj = model.model_validate(doc)
        if isinstance(obj, VMDiskClass):
            _check_class(obj)
    except ValidationError as exc:
        raise ManifestError(
            [f"{where}: {kind}/{name}: {line}" for line in describe_errors(exc)]
        ) from None
    except ValueError as exc:
        raise ManifestError([f"{where}: {kind}/{name}: {exc}"]) from None
    size = obj.spec.size_bytes if isinstance(obj, VMDisk) else None
    if max_size is not None and size is not None and size > max_size:
        raise ManifestError(
            [f"{where}: {kind}/{name}: spec.size: {size} bytes is over the maximum of {max_size}"]
        )
    return obj


def _check_class(obj: VMDiskClass) -> None:
    """A class's parameters, by its backend's own model (as the CRD schema does)."""
    from ..backends.registry import PLUGINS_BY_NAME  # every backend: only for classes

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


def load(
    target: Path, *, max_size: int | None = None, namespace: str | None = None
) -> list[Object]:
    """All objects in a file or a directory of files; every problem reported at once."""
    return validate(*read_documents(target), max_size=max_size, namespace=namespace)


def validate(
    documents: Sequence[Document],
    problems: Sequence[Problem] = (),
    *,
    max_size: int | None = None,
    namespace: str | None = None,
) -> list[Object]:
    """The objects of ``documents``, or ManifestError with ``problems`` and each bad
    field, in the order of the files."""
    objects: list[Object] = []
    found: list[str] = []
    for index, (where, doc) in enumerate(documents):
        found += [line for before, line in problems if before == index]
        try:
            objects.append(parse(doc, where, max_size=max_size, namespace=namespace))
        except ManifestError as exc:
            found.extend(exc.problems)
    found += [line for before, line in problems if before >= len(documents)]
    if found:
        raise ManifestError(found)
    return objects
