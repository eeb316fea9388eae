"""Safety checks on an image's bytes before it may enter the cache.

Two independent opinions: oslo.utils' format inspector (pure Python, reads
headers without trusting qemu) detects the real format and runs its safety
checks; then ``qemu-img info``/``check`` under resource limits confirm it.
The declared format is compared with the detected one, never used to probe.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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
# Formats the inspector names that qemu reads as plain raw bytes (an MBR
# disk is reported as gpt).
_RAW_LIKE = frozenset({"raw", "gpt", "iso"})
# qemu probes 2 KiB for a VMDK text descriptor; we look at far more (an ISO
# system area is 32 KiB, a boot loader gap 1 MiB) and accept more spellings.
_PROBE_BYTES = 1024 * 1024
_VMDK_PATTERNS = tuple(
    (re.compile(pattern, re.IGNORECASE | re.MULTILINE), needles)
    for pattern, needles in (
        (rb"#\s*disk\s*descriptor\s*file", (b"descriptor",)),
        (rb"\bcreate\s*type\s*=", (b"create",)),
        # qemu's probe: a version= line
        (rb"^[ \t]*version[ \t]*=[ \t]*[0-9][ \t]*\r?$", (b"version",)),
        # An extent line: access, size in sectors, type, then the file it names.
        (
            rb"^[ \t]*(?:rw|rdonly|noaccess)[ \t]+[0-9]+[ \t]+"
            rb"(?:flat|sparse|zero|vmfs\w*|sesparse)\b",
            (b"flat", b"sparse", b"zero", b"vmfs"),
        ),
        (rb"\bddb\.(?:adaptertype|geometry|virtualhwversion)\b", (b"ddb.",)),
        (rb"\bparentfilenamehint\s*=", (b"parentfilenamehint",)),
    )
)
"""Each pattern with the words a match must contain (lower case): a pattern
anchored by ``^`` or ``\b`` is tried at every byte (~10 ms per MiB), a word
is looked for with memchr-speed ``in`` first."""


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
    # Imported here: oslo.utils costs ~45 ms, and only image checks need it
    # (not ``vmdisk get`` and the other commands that never see an image).
    from oslo_utils.imageutils import format_inspector

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
    if detected in _RAW_LIKE:
        check_no_vmdk_descriptor(path, name)
    return detected


def check_no_vmdk_descriptor(path: Path, name: str) -> None:
    """Refuse raw-like bytes that hold a VMDK text descriptor in their first MiB.

    Harmless as raw (vmdisk always passes ``-f``), but qemu would follow its
    extents (host files) if anything ever probed the file; the check errs on
    the side of refusing, since a real disk has no such text up front.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        head = handle.read(_PROBE_BYTES)
    lowered = head.lower()  # ASCII only, like IGNORECASE on bytes
    for pattern, needles in _VMDK_PATTERNS:
        if not any(needle in lowered for needle in needles):
            continue  # it cannot match
        match = pattern.search(head)
        if match is not None:
            raise ImageUnsafe(
                f"image {name} holds a VMDK descriptor ({match.group(0).strip()[:40]!r} at "
                f"byte {match.start()}), which makes qemu open other files; refusing it"
            )
