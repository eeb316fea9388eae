"""Typed wrappers around ``qemu-img``.

The format is always passed explicitly (``-f``/``-F``): qemu-img never
probes, so a raw image that happens to start with a qcow2 header cannot be
reinterpreted (Nova bug 1221190 and friends).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .run import UNTRUSTED, CommandError, Progress, run

_QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    snapshots: tuple[str, ...] = ()
    format_specific: dict[str, Any] = field(default_factory=dict)


def info(path: Path, fmt: str, *, untrusted: bool = False, timeout: float = 60.0) -> ImageInfo:
    """``qemu-img info`` of one image (no backing chain), format given, not probed."""
    argv = [_QEMU_IMG, "info", "-f", fmt, "--output=json", "--force-share", str(path)]
    result = run(argv, timeout=timeout, limits=UNTRUSTED if untrusted else None)
    data = json.loads(result.stdout)
    specific = data.get("format-specific", {}).get("data", {}) or {}
    return ImageInfo(
        format=data["format"],
        virtual_size=int(data["virtual-size"]),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=data.get("backing-filename"),
        backing_format=data.get("backing-filename-format"),
        data_file=specific.get("data-file"),
        snapshots=tuple(s["name"] for s in data.get("snapshots", [])),
        format_specific=specific,
    )


def check(path: Path, fmt: str, *, timeout: float = 600.0) -> str | None:
    """Return None when the image is consistent, else qemu-img's complaint.

    Exit code 3 (leaked clusters) is harmless and treated as consistent.
    """
    try:
        run(
            [_QEMU_IMG, "check", "-f", fmt, str(path)],
            timeout=timeout,
            limits=UNTRUSTED,
        )
    except CommandError as exc:
        if exc.returncode == 3:
            return None
        return (exc.stderr or exc.stdout).strip() or f"qemu-img check exited {exc.returncode}"
    return None


def _options(options: dict[str, str]) -> list[str]:
    if not options:
        return []
    return ["-o", ",".join(f"{k}={v}" for k, v in sorted(options.items()))]


def create(
    path: Path,
    fmt: str,
    size: int | None,
    *,
    backing: Path | None = None,
    backing_format: str | None = None,
    options: dict[str, str] | None = None,
    timeout: float = 3600.0,
) -> None:
    """Create an image; with ``backing`` an overlay, backing format always given."""
    argv = [_QEMU_IMG, "create", "-q", "-f", fmt, *_options(options or {})]
    if backing is not None:
        if backing_format is None:
            raise ValueError("a backing file needs its format (-F)")
        argv += ["-b", str(backing), "-F", backing_format]
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    run(argv, timeout=timeout)


def convert(
    source: Path,
    source_format: str,
    target: Path,
    target_format: str,
    *,
    snapshot: str | None = None,
    target_backing: Path | None = None,
    target_backing_format: str | None = None,
    options: dict[str, str] | None = None,
    target_exists: bool = False,
    target_is_zero: bool = False,
    timeout: float = 3600.0,
    progress: Progress | None = None,
) -> None:
    """Convert ``source`` to ``target``; both formats explicit, sparse output.

    ``target_exists`` writes into an existing image (``-n``); when that image
    was just created and reads as zeros, ``target_is_zero`` lets qemu skip
    the source's zeros so the target stays sparse (without it qemu writes
    every zero block of an existing target).

    The target is flushed to stable storage before this returns (``-t
    writeback``: qemu-img's default cache mode for convert, ``unsafe``, never
    syncs), so a disk renamed into place afterwards holds its data after a crash.
    """
    if target_is_zero and not target_exists:
        raise ValueError("target_is_zero describes an existing target")
    quiet = "-p" if progress is not None else "-q"
    argv: list[str] = [_QEMU_IMG, "convert", quiet, "-t", "writeback"]
    argv += ["-f", source_format, "-O", target_format]
    if snapshot is not None:
        argv += ["-l", f"snapshot.name={snapshot}"]
    if target_backing is not None:
        argv += ["-B", str(target_backing), "-F", target_backing_format or "raw"]
    if target_exists:
        argv.append("-n")
    if target_is_zero:
        argv.append("--target-is-zero")
    argv += _options(options or {})
    argv += [str(source), str(target)]
    run(argv, timeout=timeout, progress=progress)


def resize(
    path: Path, fmt: str, size: int, *, preallocation: str = "none", timeout: float = 600.0
) -> None:
    """Grow an image to ``size`` bytes (shrinking is refused by callers first).

    ``preallocation`` (metadata, falloc, full) allocates the new part the way
    the disk was made.
    """
    extra = [f"--preallocation={preallocation}"] if preallocation != "none" else []
    run([_QEMU_IMG, "resize", "-q", "-f", fmt, *extra, str(path), str(size)], timeout=timeout)


def snapshot(path: Path, fmt: str, action: str, name: str) -> None:
    """Internal snapshot operations: ``-c`` create, ``-a`` apply, ``-d`` delete.

    ``qemu-img snapshot`` has no ``-f``; ``--image-opts`` names the driver so
    the format is still never probed.
    """
    if action not in ("-c", "-a", "-d"):
        raise ValueError(f"unknown snapshot action {action}")
    spec = f"driver={fmt},file.filename={_escape_opt(str(path))}"
    run([_QEMU_IMG, "snapshot", "-q", "--image-opts", action, name, spec], timeout=600.0)


def _escape_opt(value: str) -> str:
    """QemuOpts escape commas by doubling them."""
    return value.replace(",", ",,")
