"""Per-node names for everything an agent writes into shared objects.

Every agent sees every object, so the finalizer and kopf's progress and
diff-base annotations carry the node's name: two agents never write the
same key, and one agent's bookkeeping never hides an object from another.
Pure functions, no kopf.
"""

from __future__ import annotations

import hashlib
import re

GROUP_DOMAIN = "vmdisk.io"
_NAME_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _short(node: str, limit: int) -> str:
    """The node name when it fits, else a readable prefix plus a stable hash."""
    if len(node) <= limit:
        return node
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    return f"{node[: limit - 11].rstrip('.-')}-{digest}"


def finalizer(node: str) -> str:
    """``vmdisk.io/<node>``: a qualified name, the part after ``/`` at most 63 characters."""
    name = _short(node, 63)
    if not _NAME_PART.match(name):
        raise ValueError(f"node name {node!r} cannot be used in a finalizer")
    return f"{GROUP_DOMAIN}/{name}"


def annotation_prefix(node: str) -> str:
    """``<node>.node.vmdisk.io``: a DNS subdomain prefix for kopf's annotations."""
    labels = [_short(part, 63) for part in node.lower().split(".")]
    prefix = ".".join([*labels, "node", GROUP_DOMAIN])
    if len(prefix) > 253 or not all(_LABEL.match(label) for label in labels):
        digest = hashlib.sha256(node.encode()).hexdigest()[:16]
        prefix = f"n{digest}.node.{GROUP_DOMAIN}"
    return prefix
