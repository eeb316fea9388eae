"""Hostile manifests through the CLI: alias bombs, deep nesting, duplicate keys, huge
numbers, names at the filesystem's limit, mistagged collections.  Every one ends as
``error:`` lines and exit code 2 within a bounded time, with no traceback and nothing
written.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydantic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdisk import cli
from vmdisk.api.vmdisk import VMDisk

VMDISK = [sys.executable, "-m", "vmdisk.cli"]

BASE = """apiVersion: vmdisk.io/v1alpha1
kind: VMDisk
metadata: {name: %(name)s, namespace: vms}
spec:
  backend: raw
  size: %(size)s
  source: {blank: {}}
"""


def manifest(name: str = "d", size: str = "1Mi") -> str:
    return BASE % {"name": name, "size": size}


def bomb(width: int, depth: int) -> str:
    lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for level in range(1, depth + 1):
        refs = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"l{level}: &l{level} [{refs}]")
    return manifest() + "\n".join(lines) + "\n"


def nested(depth: int, opener: str) -> str:
    close = {"[": "]", "{": "}"}[opener]
    inner = (opener + ("a: " if opener == "{" else "")) * depth + "1" + close * depth
    return manifest().replace("source: {blank: {}}", "source: {blank: {}}\n  extra: " + inner)


def duplicate(key: str) -> str:
    lines = manifest().splitlines()
    where = {"kind": 1, "size": 5, "backend": 4}[key]
    return "\n".join([*lines[: where + 1], lines[where], *lines[where + 1 :]]) + "\n"


# Sources the junk generator can stumble on that are simply valid.
def valid_source(junk: object) -> bool:
    """Whether the models take ``junk`` as a source (``{blank: {}, image: null}`` is one:
    a null member is an absent one, as on the API server); those are not hostile."""
    spec = {"backend": "raw", "size": "1Mi", "source": junk}
    try:
        VMDisk.model_validate({"apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDisk",
                               "metadata": {"name": "d"}, "spec": spec})  # fmt: skip
    except (pydantic.ValidationError, TypeError, ValueError):
        return False
    return True


# Generous for a loaded 2-core machine; an unbounded loader takes minutes or hangs.
BOUND_S = 20.0

hostile = st.one_of(
    st.builds(bomb, st.integers(8, 12), st.integers(6, 8)),  # > 100 000 nodes expanded
    st.builds(nested, st.integers(65, 3000), st.sampled_from(["[", "{"])),
    st.builds(duplicate, st.sampled_from(["kind", "size", "backend"])),
    st.builds(
        lambda n: manifest(size=n), st.integers(2**63, 2**200).map(str) | st.just("1" + "0" * 5000)
    ),
    st.builds(lambda e: manifest(size=f"{e}Ei"), st.integers(9, 10**6)),
    st.builds(lambda n: manifest(name="a" * n), st.integers(254, 600)),
    st.just("a: &a [*a]\n"),
    st.just(manifest() + "\0"),
    st.binary(min_size=1, max_size=40).map(lambda b: manifest() + "x: " + repr(b)[2:-1] + "\xff"),
    st.builds(
        lambda junk: manifest().replace("source: {blank: {}}", f"source: {json.dumps(junk)}"),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.sampled_from(["image", "blank", "disk", "url"]), inner)
            ),
            max_leaves=6,
        ).filter(lambda junk: not valid_source(junk)),
    ),
)


def run_cli(path: Path, state: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["apply", "-f", str(path), "--state-dir", str(state)])
    return code, err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostile)
def test_generated_hostile_manifests_exit_2_with_an_error_line(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        started = time.monotonic()
        code, err = run_cli(path, Path(tmp) / "state")  # an exception here fails the test
        assert time.monotonic() - started < BOUND_S
        assert code == 2, err
        assert err.startswith("error: ") and "Traceback" not in err
        assert not (Path(tmp) / "state").exists()  # refused before anything was written


def test_the_real_command_refuses_each_class_quickly(tmp_path: Path) -> None:
    cases = {
        "bomb": (bomb(9, 8), "aliases expand to more than 100000 nodes"),
        # libyaml's scanner (where PyYAML has it) may stop at its own depth limit first.
        "deep": (nested(5000, "["), ("nested deeper than 64 levels", "maximum nesting depth")),
        "dup": (duplicate("size"), "duplicate key 'size'"),
        "recursive": ("a: &a [*a]\n", "a recursive alias"),
        "huge": (manifest(size=str(2**63)), "spec.size: 9223372036854775808 bytes is over"),
        "digits": (manifest(size="1" + "0" * 5000), "invalid YAML"),
        "name": (manifest(name="a" * 254), "metadata.name"),
        "mistagged": (manifest() + "x: !!map [1]\n", "expected a mapping node, but found sequence"),
    }
    for label, (text, expected) in cases.items():
        path = tmp_path / f"{label}.yaml"
        path.write_text(text)
        started = time.monotonic()
        result = subprocess.run(
            [*VMDISK, "apply", "-f", str(path), "--state-dir", str(tmp_path / "state")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert time.monotonic() - started < 20.0, label
        assert result.returncode == 2, (label, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, label
        wanted = (expected,) if isinstance(expected, str) else expected
        assert any(w in result.stderr for w in wanted), (label, result.stderr)
    assert not (tmp_path / "state").exists()


def test_a_name_at_the_kubernetes_limit_fits_the_state_dir(tmp_path: Path) -> None:
    """253 characters is valid for Kubernetes; every file named after it still fits NAME_MAX."""
    path = tmp_path / "long.yaml"
    path.write_text(manifest(name="a" * 253).replace("namespace: vms", "namespace: " + "n" * 63))
    result = subprocess.run(
        [*VMDISK, "apply", "-f", str(path), "--state-dir", str(tmp_path / "state"), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"]["phase"] == "Ready"
    longest = max(len(p.name.encode()) for p in (tmp_path / "state").rglob("*"))
    assert longest <= 255
