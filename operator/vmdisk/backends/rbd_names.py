"""RBD image names for VMDisks and their exported snapshots.  Pure.

A disk's image is ``vmdisk_<namespace>_<name>``; a direct snapshot's is
``vmdisk-snapshot_<namespace>_<name>``.

* Kubernetes namespaces are DNS labels and names DNS subdomains, so neither
  contains ``_``: each component is kept as is when it only holds
  ``[a-z0-9.-]``, and anything else (defence against an unvalidated name)
  becomes ``%XX`` per UTF-8 byte, ``%`` and ``_`` included.  An escaped
  component never contains ``_``, so the two ``_`` separators are found
  unambiguously and the mapping cannot collide.
* RBD forbids ``/`` and ``@`` in names (pool and snapshot separators) and
  both are escaped, as is ``:`` (QEMU's ``rbd:`` option separator).
* The ``vmdisk_`` prefix keeps other images in a shared pool (Glance's,
  Nova's ``<uuid>_disk``) out of our inventory.
"""

from __future__ import annotations

import re

DISK_PREFIX = "vmdisk"
EXPORT_PREFIX = "vmdisk-snapshot"
_PLAIN = re.compile(r"[a-z0-9.-]")
_ESCAPE = re.compile(r"%([0-9a-f]{2})")


def escape(component: str) -> str:
    """One name component, with no ``_``, ``/``, ``@`` or ``:``."""
    return "".join(
        ch if _PLAIN.fullmatch(ch) else "".join(f"%{b:02x}" for b in ch.encode())
        for ch in component
    )


def unescape(component: str) -> str:
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(component):
        raw += component[pos : match.start()].encode()
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += component[pos:].encode()
    return raw.decode()


def _join(prefix: str, namespace: str, name: str) -> str:
    if not namespace or not name:
        raise ValueError("namespace and name must not be empty")
    return f"{prefix}_{escape(namespace)}_{escape(name)}"


def disk_image(namespace: str, name: str) -> str:
    return _join(DISK_PREFIX, namespace, name)


def export_image(namespace: str, snapshot: str) -> str:
    """The image a DiskSnapshot's direct snapshot is cloned into."""
    return _join(EXPORT_PREFIX, namespace, snapshot)


def parse_disk_image(image: str) -> tuple[str, str] | None:
    """``(namespace, name)`` of one of our disk images, else None."""
    parts = image.split("_")
    if len(parts) != 3 or parts[0] != DISK_PREFIX or not parts[1] or not parts[2]:
        return None
    namespace, name = unescape(parts[1]), unescape(parts[2])
    if disk_image(namespace, name) != image:  # not canonical: not made by us
        return None
    return namespace, name
