"""Manifest files read into plain documents, within limits; no models.

Manifests are read with limits, so a hostile file fails fast with an error
line instead of hanging or crashing the tool: at most MAX_FILE_BYTES per
file and MAX_DOCUMENTS documents, nesting at most MAX_DEPTH deep, aliases
expanding to at most MAX_NODES nodes (a "billion laughs" file is refused
before anything walks it), no recursive aliases and no duplicate keys.
Validation is ``manifests``'; a no-op re-apply (``settled``) needs only this.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentEndEvent,
    Event,
    MappingStartEvent,
    ScalarEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from .problems import ManifestError

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
            if self._depth > MAX_DEPTH or self._nodes > MAX_NODES:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                _refuse_over_limits(self._depth, self._nodes, mark)
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
        pairs = node.value if isinstance(node, MappingNode) else []  # else: super() refuses it
        for key_node, _ in pairs:
            if isinstance(key_node, ScalarNode):
                key = self.construct_scalar(key_node)
                if key in seen:
                    raise _Limit(f"duplicate key {key!r}{_at(key_node.start_mark)}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Replay(_Limits):
    """The full composer and constructor over one document's events: those the fast
    path already took, then the parser's (one at a time, so errors come in the order
    the full loader alone would raise them)."""

    def __init__(self, taken: list[Event], parser: _Parser) -> None:
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._events = itertools.chain(taken, iter(parser.get_event, None))
        self._next: Event | None = None

    def peek_event(self) -> Event:
        if self._next is None:
            self._next = next(self._events)
        return self._next

    def get_event(self) -> Event:
        event, self._next = self.peek_event(), None
        return event

    def check_event(self, *choices: type[Event]) -> bool:
        return not choices or isinstance(self.peek_event(), choices)


class _Parser(Protocol):
    def get_event(self) -> Event | None: ...
    def check_event(self, *choices: type[Event]) -> bool: ...
    def dispose(self) -> None: ...


class _PurePythonParser(Reader, Scanner, Parser):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


_new_parser: Callable[[str], _Parser] = _PurePythonParser
if yaml.__with_libyaml__:  # libyaml parses; the pure-Python parser was a quarter of a re-apply
    from yaml.cyaml import CParser  # type: ignore[attr-defined]

    _new_parser = CParser


class _Limit(yaml.YAMLError):
    pass


class _Mark(Protocol):  # pyyaml's or libyaml's
    line: int
    column: int


def _at(mark: _Mark | None) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _refuse_over_limits(depth: int, nodes: int, mark: _Mark | None) -> None:
    """Refuse a node at ``depth`` that is a document's ``nodes``-th (both loaders')."""
    if depth > MAX_DEPTH:
        raise _Limit(f"nested deeper than {MAX_DEPTH} levels{_at(mark)}")
    if nodes > MAX_NODES:
        raise _Limit(f"more than {MAX_NODES} nodes{_at(mark)}")


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
    """The file's documents as yaml.safe_load_all reads them, within the limits."""
    parser = _new_parser(text)
    try:
        docs = []
        parser.get_event()  # the StreamStartEvent
        while not parser.check_event(StreamEndEvent):
            taken: list[Event] = []
            doc = _plain_document(parser, taken)
            if doc is _FULL:
                doc = _Replay(taken, parser).get_data()
            docs.append(doc)
            if len(docs) > MAX_DOCUMENTS:
                raise _Limit(f"more than {MAX_DOCUMENTS} documents")
        return [d for d in docs if d is not None]
    except ConstructorError as exc:
        raise _Limit(str(exc)) from None
    finally:
        parser.dispose()


# The fast path builds a document straight from the parser's events (composing nodes
# in Python and constructing them took two thirds of a re-apply's loading).  It takes
# plain data only: untagged scalars whose resolved type is below, mappings with
# distinct scalar keys and sequences, no anchors or aliases.  At anything else it
# returns _FULL and the document is replayed through _Replay, the full loader, which
# gives the same result and the same error in the same order as ever.  It never
# recurses (libyaml's own composer recurses in C without a depth limit, so it is
# never used) and counts depth and nodes exactly as _Limits.compose_node does.
_FULL = object()
_NO_KEY = object()  # the open mapping awaits a key
_SAFE = SafeConstructor()
_RESOLVE: Callable[[type[Node], str, tuple[bool, bool]], str] = Resolver().resolve
_MAYBE_TYPED = frozenset(Resolver.yaml_implicit_resolvers)  # first characters; else a str


def _scalar_type(tag: str) -> Callable[[str], Any]:
    construct = SafeConstructor.yaml_constructors[tag]  # as yaml.safe_load does it
    return lambda value: construct(_SAFE, ScalarNode(tag, value))


_SCALARS: dict[str, Callable[[str], Any]] = {
    f"tag:yaml.org,2002:{name}": _scalar_type(f"tag:yaml.org,2002:{name}")
    for name in ("null", "bool", "int", "float", "timestamp")
} | {"tag:yaml.org,2002:str": str}  # a plain scalar like 0x1G: matched on its first character


def _plain_document(parser: _Parser, taken: list[Event]) -> Any:
    take = taken.append
    take(_next(parser))  # the DocumentStartEvent
    root: list[Any] = []
    top: Any = root  # the open collection, a list or a dict
    key: Any = _NO_KEY  # in a dict: the key awaiting its value
    seen: set[str] = set()  # in a dict: its keys as written (as _Limits compares them)
    stack: list[tuple[Any, Any, set[str]]] = []
    nodes = 0
    while True:
        event = _next(parser)
        take(event)
        if isinstance(event, (ScalarEvent, CollectionStartEvent)):
            nodes += 1
            if len(stack) >= MAX_DEPTH or nodes > MAX_NODES:  # the root is at depth 1
                _refuse_over_limits(len(stack) + 1, nodes, event.start_mark)
            if event.anchor is not None or event.tag is not None:
                return _FULL
            in_key = key is _NO_KEY and top.__class__ is dict
            if isinstance(event, ScalarEvent):
                value = written = event.value
                if event.implicit[0] and value[:1] in _MAYBE_TYPED:
                    construct = _SCALARS.get(_RESOLVE(ScalarNode, value, (True, False)))
                    if construct is None:  # e.g. a merge key
                        return _FULL
                    try:
                        value = construct(value)
                    except ValueError:  # e.g. a huge int: raised where the full loader would
                        return _FULL
                if in_key:
                    if written in seen:
                        return _FULL  # it refuses the duplicate, after the whole document
                    seen.add(written)
                    key = value
                    continue
            elif in_key:
                return _FULL  # a collection as a key: unhashable
            else:
                stack.append((top, key, seen))
                top, key, seen = (
                    ({} if isinstance(event, MappingStartEvent) else []),
                    _NO_KEY,
                    set(),
                )
                continue
        elif isinstance(event, CollectionEndEvent):
            value = top
            top, key, seen = stack.pop()
        elif isinstance(event, DocumentEndEvent):
            return root[0]
        else:  # an alias
            return _FULL
        if key is _NO_KEY:
            top.append(value)
        else:
            top[key] = value
            key = _NO_KEY


def _next(parser: _Parser) -> Event:
    event = parser.get_event()
    assert event is not None  # only after the StreamEndEvent, never asked for
    return event


def _files(target: Path) -> list[Path]:
    if target.is_dir():
        found = sorted(
            p for p in target.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
        )
        if len(found) > MAX_FILES:
            raise ManifestError([f"{target}: more than {MAX_FILES} manifest files"])
        return found
    return [target]


Document = tuple[str, Any]  # where it is ("file (document 2)") and what it holds
Problem = tuple[int, str]  # a file that could not be read: before which document, and why


def read_documents(target: Path) -> tuple[list[Document], list[Problem]]:
    """The documents of a file or a directory of files, and the problems of those
    that could not be read (each file is read or refused as a whole)."""
    if not target.exists():
        raise ManifestError([f"{target}: no such file or directory"])
    documents: list[Document] = []
    problems: list[Problem] = []
    for path in _files(target):
        here = len(documents)
        try:
            docs = _documents(_read(path))
        except ManifestError as exc:
            problems.extend((here, line) for line in exc.problems)
            continue
        except OSError as exc:
            problems.append((here, f"{path}: cannot read: {exc.strerror or exc}"))
            continue
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a huge int literal
            problems.append((here, f"{path}: invalid YAML: {_one_line(exc)}"))
            continue
        for index, doc in enumerate(docs, start=1):
            documents.append((f"{path}" + (f" (document {index})" if len(docs) > 1 else ""), doc))
    return documents, problems


def with_namespace(doc: Any, namespace: str | None) -> Any:
    """``doc`` as ``apply -n namespace`` takes it: a namespaced object gets ``namespace``
    (one that names another namespace is refused by validation, before this)."""
    if namespace is None or not isinstance(doc, dict) or doc.get("kind") == "VMDiskClass":
        return doc
    meta = doc.get("metadata")
    return {**doc, "metadata": {**meta, "namespace": namespace}} if isinstance(meta, dict) else doc


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
