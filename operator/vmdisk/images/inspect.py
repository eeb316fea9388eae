"""Safety checks on an image's bytes before it may enter the cache.

Two independent opinions: oslo.utils' format inspector (pure Python, reads
headers without trusting qemu) detects the real format and runs its safety
checks; then ``qemu-img info``/``check`` under resource limits confirm it.
The declared format is compared with the detected one, never used to probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oslo_utils.imageutils import format_inspector

from ..errors import (
    ImageCorrupt,
    ImageFormatMismatch,
    ImageFormatUnsupported,
    ImageLargerThanDisk,
    ImageTooLarge,
    ImageUnsafe,
)
from ..host import qemu_img
from ..host.run import CommandError

BASE_FORMATS = frozenset({"raw", "qcow2"})
# Formats the inspector names that qemu reads as plain raw bytes.
_RAW_LIKE = frozenset({"raw", "gpt", "iso"})
# qemu probes the first 2 KiB for a VMDK text descriptor; so do we.
_PROBE_BYTES = 2048
_VMDK_MARKERS = (b"# disk descriptorfile", b"createtype=")


@dataclass(frozen=True)
class Verified:
    format: str
    virtual_size: int


def inspect_image(
    path: Path,
    *,
    name: str,
    declared: str | None,
    max_virtual_size: int,
    disk_size: int | None,
) -> Verified:
    """Verify an untrusted image file; return its real format and virtual size.

    ``name`` identifies the image in messages.  Raises ImageUnsafe,
    ImageFormatMismatch, ImageFormatUnsupported, ImageTooLarge,
    ImageLargerThanDisk or ImageCorrupt.
    """
    detected = _detect(path, name)
    fmt = "raw" if detected in _RAW_LIKE else detected
    if declared is not None and fmt != declared:
        raise ImageFormatMismatch(
            f"image {name} was declared {declared} but its content is {detected}"
        )
    if fmt not in BASE_FORMATS:
        raise ImageFormatUnsupported(
            f"image {name} is {detected}; only raw and qcow2 images can be used as a base"
        )
    try:
        info = qemu_img.info(path, fmt, untrusted=True)
    except CommandError as exc:
        raise ImageCorrupt(f"qemu-img cannot read image {name} as {fmt}: {exc}") from exc
    if info.backing_file or info.data_file or info.format != fmt:
        raise ImageUnsafe(
            f"qemu-img reports image {name} as {info.format} with backing file "
            f"{info.backing_file!r} and data file {info.data_file!r}; refusing it"
        )
    if info.virtual_size <= 0:
        raise ImageCorrupt(f"image {name} is empty")
    check_size(info.virtual_size, name=name, max_virtual_size=max_virtual_size, disk_size=disk_size)
    if fmt == "qcow2":
        problem = qemu_img.check(path, fmt)
        if problem is not None:
            raise ImageCorrupt(f"image {name} failed qemu-img check: {problem}")
    return Verified(fmt, info.virtual_size)


def check_size(
    virtual_size: int, *, name: str, max_virtual_size: int, disk_size: int | None
) -> None:
    """Refuse images over the node's ceiling or larger than the disk made from them."""
    if virtual_size > max_virtual_size:
        raise ImageTooLarge(
            f"image {name} has a virtual size of {virtual_size} bytes, "
            f"over the limit of {max_virtual_size} bytes"
        )
    if disk_size is not None and virtual_size > disk_size:
        raise ImageLargerThanDisk(
            f"image {name} has a virtual size of {virtual_size} bytes but the disk is "
            f"only {disk_size} bytes; make spec.size at least {virtual_size}"
        )


def _detect(path: Path, name: str) -> str:
    """The format the bytes really are, after the inspector's safety checks."""
    try:
        inspector = format_inspector.detect_file_format(str(path))
        if inspector is None:
            raise format_inspector.ImageFormatError("format could not be determined")
        inspector.safety_check()
    except format_inspector.SafetyCheckFailed as exc:
        reasons = "; ".join(f"{check}: {err}" for check, err in sorted(exc.failures.items()))
        raise ImageUnsafe(f"image {name} failed safety checks: {reasons}") from exc
    except format_inspector.ImageFormatError as exc:
        raise ImageUnsafe(f"image {name} has an ambiguous or invalid format: {exc}") from exc
    detected = str(inspector.NAME)
    if detected == "raw":
        with open(path, "rb") as handle:
            head = handle.read(_PROBE_BYTES)
        # A raw file holding a VMDK descriptor is harmless as raw, but qemu
        # would follow its extents (host files) if anything ever probed it.
        if any(marker in head.lower() for marker in _VMDK_MARKERS):
            raise ImageUnsafe(f"image {name} is a VMDK descriptor that references other files")
    return detected
