"""The grammars of names host tools accept, checked before any tool sees one.  Pure.

A name from a class or a disk that does not match is refused with
``UnsafeName``; so is one that could be read as an option (leading ``-``),
whatever the tool.  Callers pass names after ``--`` where the tool has it.
"""

from __future__ import annotations

import re

from ..errors import UnsafeName

# LVM's own rule for VG and LV names (lib/misc/lvm-string.c: validate_name):
# these characters, not starting with "-", not "." or "..", under 128 bytes.
LVM_NAME_PATTERN = r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$"
# Narrower than what Ceph accepts, on purpose: no separators of QEMU's rbd:
# syntax or of pool/image@snapshot, no leading "-", no blanks or controls.
CEPH_POOL_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
CEPH_USER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
CEPH_IMAGE_PATTERN = r"^[A-Za-z0-9_.%+=][A-Za-z0-9_.%+=-]{0,511}$"

_LVM = re.compile(LVM_NAME_PATTERN)
_CEPH = {
    "pool": re.compile(CEPH_POOL_PATTERN),
    "user": re.compile(CEPH_USER_PATTERN),
    "image": re.compile(CEPH_IMAGE_PATTERN),
    "snapshot": re.compile(CEPH_IMAGE_PATTERN),
}


def check_lvm_name(what: str, name: str) -> str:
    """``name`` when LVM's grammar allows it as a VG or LV name, else UnsafeName."""
    if not _LVM.fullmatch(name) or name in (".", ".."):
        raise UnsafeName(
            f"{what} {name!r} is not a valid LVM name: letters, digits and '+_.-', "
            "not starting with '-', at most 127 characters"
        )
    return name


def check_ceph_name(kind: str, name: str) -> str:
    """``name`` when it fits the grammar for a Ceph ``kind`` (pool, user, image, snapshot)."""
    if not _CEPH[kind].fullmatch(name) or name in (".", ".."):
        raise UnsafeName(f"{name!r} is not an acceptable Ceph {kind} name")
    return name
