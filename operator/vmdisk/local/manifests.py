"""Reading manifests from files and turning validation errors into field paths.

Manifests are read with limits, so a hostile file fails fast with an error
line instead of hanging or crashing the tool: at most MAX_FILE_BYTES per
file and MAX_DOCUMENTS documents, nesting at most MAX_DEPTH deep, aliases
expanding to at most MAX_NODES nodes (a "billion laughs" file is refused
before anything walks it), no recursive aliases and no duplicate keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from ..api.errors import describe_errors
from ..api.snapshot import DiskSnapshot
from ..api.vmdisk import VMDisk
from ..api.vmdiskclass import VMDiskClass
from .problems import ManifestError

__all__ = ["ManifestError", "load"]
Object = VMDisk | DiskSnapshot | VMDiskClass
KINDS: dict[str, type[VMDisk] | type[DiskSnapshot] | type[VMDiskClass]] = {
    "VMDisk": VMDisk,
    "DiskSnapshot": DiskSnapshot,
    "VMDiskClass": VMDiskClass,
}


MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DOCUMENTS = 1000
MAX_DEPTH = 64
MAX_NODES = 100_000  # after alias expansion, per document
MAX_FILES = 10_000


class _Limits(Composer, SafeConstructor, Resolver):
    """Safe loading with depth, expansion and duplicate-key limits (over any parser)."""

    _depth = 0
    _nodes = 0  # composed in this document
    _aliased = False  # this document has an alias: its expansion must be walked

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise _Limit(f"nested deeper than {MAX_DEPTH} levels{_at(mark)}")
            if self._nodes > MAX_NODES:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise _Limit(f"more than {MAX_NODES} nodes{_at(mark)}")
            self._aliased = self._aliased or self.check_event(AliasEvent)  # type: ignore[attr-defined]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: Node) -> Any:
        aliased, self._aliased, self._nodes = self._aliased, False, 0
        if aliased:  # without aliases every node was counted as it was composed
            _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode):
                key = self.construct_scalar(key_node)
                if key in seen:
                    raise _Limit(f"duplicate key {key!r}{_at(key_node.start_mark)}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _PurePythonLoader(_Limits, Reader, Scanner, Parser):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)


_LimitedLoader: Callable[[str], Any] = _PurePythonLoader
if yaml.__with_libyaml__:
    from yaml.cyaml import CParser  # type: ignore[attr-defined]

    class _LibyamlLoader(_Limits, CParser):
        """libyaml parses (the pure-Python parser was a quarter of a re-apply); the
        composing stays in Python, where the depth limit is (libyaml's composer
        recurses in C without one)."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _LimitedLoader = _LibyamlLoader


class _Limit(yaml.YAMLError):
    pass


def _at(mark: yaml.Mark | None) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _check_expansion(root: Node) -> None:
    """Refuse recursive aliases, and documents whose aliases expand past MAX_NODES."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        if done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_NODES:
                raise _Limit(f"aliases expand to more than {MAX_NODES} nodes{_at(node.start_mark)}")
            continue
        if key in sizes:
            continue
        if key in active:
            raise _Limit(f"a recursive alias{_at(node.start_mark)}")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def _read(path: Path) -> str:
    """The file's text, refusing huge or non-regular files (a FIFO would block)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not os.path.isfile(path):
            raise ManifestError([f"{path}: not a regular file"])
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError([f"{path}: larger than {MAX_FILE_BYTES} bytes"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{path}: not UTF-8 text: {exc}"]) from None


def _documents(text: str) -> list[Any]:
    loader = _LimitedLoader(text)
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
            if len(docs) > MAX_DOCUMENTS:
                raise _Limit(f"more than {MAX_DOCUMENTS} documents")
        return [d for d in docs if d is not None]
    except ConstructorError as exc:
        raise _Limit(str(exc)) from None
    finally:
        loader.dispose()


def _files(target: Path) -> list[Path]:
    if target.is_dir():
        found = sorted(
            p for p in target.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
        )
        if len(found) > MAX_FILES:
            raise ManifestError([f"{target}: more than {MAX_FILES} manifest files"])
        return found
    return [target]


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
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}
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
    if not target.exists():
        raise ManifestError([f"{target}: no such file or directory"])
    objects: list[Object] = []
    problems: list[str] = []
    for path in _files(target):
        try:
            docs = _documents(_read(path))
        except ManifestError as exc:
            problems.extend(exc.problems)
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a huge int literal
            problems.append(f"{path}: invalid YAML: {_one_line(exc)}")
            continue
        for index, doc in enumerate(docs, start=1):
            where = f"{path}" + (f" (document {index})" if len(docs) > 1 else "")
            try:
                objects.append(parse(doc, where, max_size=max_size, namespace=namespace))
            except ManifestError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return objects


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
