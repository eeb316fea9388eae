"""documents._documents, the loader of ``apply -f``: its fast path (straight from the
parser's events) gives what ``yaml.safe_load_all`` gives, and what the full loader
(composer and constructor, with the limits) gives, errors and their messages included.
"""

from __future__ import annotations

import datetime
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdisk.local import documents as loader
from vmdisk.local.documents import MAX_DEPTH, MAX_DOCUMENTS, MAX_NODES, _documents


def full_documents(text: str) -> list[Any]:
    """_documents with every document through the full loader (the fast path declines)."""

    def decline(parser: Any, taken: list[Any]) -> object:
        taken.append(parser.get_event())  # the DocumentStartEvent
        return loader._FULL

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(loader, "_plain_document", decline)
        return _documents(text)


def outcome(load: Any, text: str) -> tuple[str, str]:
    """What loading gives: the documents' repr (order, types, nan and all), or the error."""
    try:
        return "ok", repr(load(text))
    except (yaml.YAMLError, ValueError) as exc:
        return type(exc).__name__, str(exc)


def safe_load_all(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


# Plain scalars YAML 1.1 (as pyyaml resolves it) reads as something other than a string,
# or nearly so, and scalars with tags, quotes, anchors and aliases.
PLAIN = [
    *("0x1F", "0o17", "017", "0b101", "1_000", "190:20:30", "-1:30", "0", "-0", "+12", "08"),
    *("1.5", "6.8523015e+5", "685.230_15e+03", "190:20:30.15", "1e3", "3.", ".5", "-.5e-3"),
    *(".inf", "-.Inf", "+.INF", ".NaN", ".nan", ".Nan"),
    *("yes", "No", "ON", "off", "y", "n", "True", "FALSE", "tRUE"),
    *("~", "null", "NULL", "Null", "nULL"),
    *("2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "2002-12-14", "2001-02-30"),
    *("<<", "=", "a", "b", "hello world", "9" * 4301, "0x", "1__", "-", "1:2:3:4"),
]
QUOTED = ["'yes'", '"1"', '""', "''", '"a\\tb"', "'<<'"]
TAGGED = [
    *("!!str 1", "!!int '7'", "!!int x", "!!float 1", "!!bool yes", "!!null ''"),
    *("!!binary aGVsbG8=", "!!binary '!'", "!!timestamp 2002-12-14", "! 12", "!local x"),
    *("!!python/none ''", "&a 1", "&b x", "*a", "*b", "*nowhere"),
]
scalars = (
    st.sampled_from(PLAIN + QUOTED)
    | st.sampled_from(TAGGED)
    | st.from_regex(r"\A[a-z0-9.:_+-]{1,6}\Z")
)
keys = st.sampled_from(["a", "b", "1", "0x1", "yes", "true", "~", "null", "<<", "'a'", "*a"])
PREFIXES = ["", "", "", "", "&a ", "&c ", "!!set ", "!!omap ", "!!pairs ", "!!seq ", "!!map "]


def flow(node: Any) -> str:
    prefix, value = node
    if isinstance(value, list):
        return prefix + "[" + ", ".join(flow(v) for v in value) + "]"
    if isinstance(value, tuple):
        return prefix + "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value) + "}"
    return str(value)


def block(node: Any, indent: str = "") -> str:
    """Block style where it is simple (flow below), so both styles' events are seen."""
    prefix, value = node
    if prefix or not value or not isinstance(value, (list, tuple)):
        return " " + flow(node) + "\n"
    if isinstance(value, list):
        return "\n" + "".join(f"{indent}-{block(v, indent + '  ')}" for v in value)
    return "\n" + "".join(f"{indent}{k}:{block(v, indent + '  ')}" for k, v in value)


nodes = st.recursive(
    st.tuples(st.just(""), scalars),
    lambda inner: st.tuples(
        st.sampled_from(PREFIXES),
        st.lists(inner, max_size=4) | st.lists(st.tuples(keys, inner), max_size=4).map(tuple),
    ),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> str:
    texts = []
    for node in draw(st.lists(nodes, min_size=1, max_size=3)):
        texts.append(draw(st.sampled_from([flow, block]))(node).strip(" \n") + "\n")
    return "---\n".join(texts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=documents())
def test_the_fast_path_reads_as_the_full_loader_and_safe_load(text: str) -> None:
    got = outcome(_documents, text)
    assert got == outcome(full_documents, text), text
    if got[0] == "ok":
        assert got == outcome(safe_load_all, text), text


data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.dates()
    | st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.none() | st.booleans() | st.integers() | st.text(max_size=4), inner)
    ),
    max_leaves=16,
)
dump_styles = st.fixed_dictionaries(
    {"default_flow_style": st.sampled_from([False, True, None]), "explicit_start": st.booleans()}
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(data, min_size=1, max_size=3), style=dump_styles)
def test_dumped_data_reads_back_as_safe_load_reads_it(
    docs: list[Any], style: dict[str, bool | None]
) -> None:
    text = yaml.safe_dump_all(docs, **style)
    got = outcome(_documents, text)
    assert got == outcome(full_documents, text), text
    if not got[1].startswith("duplicate key"):  # keys compare as written: null and 'null' clash
        assert got == outcome(safe_load_all, text), text


def test_the_bench_manifests_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain manifests (ints, bools and nulls too) never reach the full loader."""
    doc = {"apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDisk", "metadata": {"name": "d"}}
    doc["spec"] = {"size": 1024, "readOnly": True, "x": None, "ratio": 0.5, "l": [1, "a"]}
    text = yaml.safe_dump_all([doc] * 3)
    monkeypatch.setattr(loader, "_Replay", None)  # calling it fails
    assert _documents(text) == [doc] * 3


def nested(depth: int, opener: str = "[") -> str:
    closer = {"[": "]", "{a: ": "}", "- ": ""}[opener]
    return opener * depth + "1" + closer * depth


@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_nesting_is_refused_past_max_depth_where_the_full_loader_refuses_it(
    opener: str,
) -> None:
    assert _documents(nested(MAX_DEPTH - 1, opener))  # the scalar is at depth MAX_DEPTH
    for text in (nested(MAX_DEPTH, opener), nested(MAX_DEPTH, opener) + "\n---\n&a [*a]"):
        got = outcome(_documents, text)
        assert got[1].startswith(f"nested deeper than {MAX_DEPTH} levels (line 1, column ")
        assert got == outcome(full_documents, text)


@pytest.mark.parametrize("unit", ["[", "[1, ", "{a: ", "- "])
def test_a_file_of_openers_is_refused_at_once(unit: str) -> None:
    """4 MiB of openers: refused at the 65th level, before anything could recurse on it
    (libyaml's scanner, looking ahead for a key, may refuse ``[[[...`` at 1000 first)."""
    text = unit * (loader.MAX_FILE_BYTES // len(unit))
    started = time.monotonic()
    kind, message = outcome(_documents, text)
    assert time.monotonic() - started < 1.0
    assert message.startswith("nested deeper than 64 levels (line 1, column ") or (
        unit == "[" and "exceeded maximum nesting depth" in message
    ), message
    assert (kind, message) == outcome(full_documents, text)


def test_node_counts_and_documents_are_limited_on_the_fast_path() -> None:
    for text in ("[" + "1, " * (MAX_NODES - 1) + "1]", "[" + "[], " * (MAX_NODES - 1) + "1]"):
        got = outcome(_documents, text)
        assert got == ("_Limit", f"more than {MAX_NODES} nodes (line 1, column {len(text) - 1})")
        assert got == outcome(full_documents, text)
    assert len(_documents("[" + "1, " * (MAX_NODES - 2) + "1]")[0]) == MAX_NODES - 1
    assert len(_documents("---\na: 1\n" * MAX_DOCUMENTS)) == MAX_DOCUMENTS
    with pytest.raises(yaml.YAMLError, match=f"^more than {MAX_DOCUMENTS} documents$"):
        _documents("---\na: 1\n" * (MAX_DOCUMENTS + 1))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: 2\na: 3\n", "duplicate key 'a' (line 3, column 1)"),
        ("a: 1\n'a': 2\n", "duplicate key 'a' (line 2, column 1)"),
        ("x: &m {a: 1}\ny: {<<: *m, b: 1, b: 2}\n", "duplicate key 'b' (line 2, column 19)"),
        ("a: [1, {b: 1}]\nc: {b: 1, b: 1}\n", "duplicate key 'b' (line 2, column 11)"),
    ],
)
def test_duplicate_keys_are_refused_on_both_paths(text: str, message: str) -> None:
    with pytest.raises(yaml.YAMLError, match=f"^{re.escape(message)}$"):
        _documents(text)


def test_equal_keys_written_differently_are_not_duplicates() -> None:
    """As before (and as safe_load): keys are compared as written; the last value wins."""
    assert repr(_documents("1: a\n0x1: b\nyes: c\ntrue: d\n")) == "[{1: 'd'}]"


def test_the_full_loader_handles_what_the_fast_path_declines() -> None:
    text = "a: &x [1, 2]\nb: *x\nc: {<<: {m: 1}, n: 2}\nd: !!set {p}\ne: !!binary aGk=\nf: ! 1\n"
    assert _documents(text) == [
        {"a": [1, 2], "b": [1, 2], "c": {"m": 1, "n": 2}, "d": {"p"}, "e": b"hi", "f": 1}
    ]
    with pytest.raises(yaml.YAMLError, match=r"^a recursive alias \(line 1, column 4\)$"):
        _documents("a: &a [*a]\n")


def iter_floats(doc: Any) -> Iterator[float]:
    if isinstance(doc, float):
        yield doc
    elif isinstance(doc, list):
        for item in doc:
            yield from iter_floats(item)


def test_special_floats() -> None:
    got = list(iter_floats(_documents("[.inf, -.Inf, .NaN, 1_0.5, 1:30.5]")[0]))
    assert got[:2] == [math.inf, -math.inf] and math.isnan(got[2]) and got[3:] == [10.5, 90.5]
