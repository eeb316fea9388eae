"""The store's object files as plain JSON, read without models.

An object file holds the object (camelCase, as the API server would store
it) and, beside it, two top-level keys that are never part of the object:

- ``hostFingerprint``: what the status was reconciled against (``settled``);
- ``hostApplied``: the manifest document last applied, bound to the object it
  was stored as (status aside), so that a re-apply of the same document can
  be known to change nothing without validating it again.

``store`` writes them; a no-op re-apply reads only this module, ``documents``
and ``settled``, and never builds a model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from ..layout import CLUSTER_SCOPE, StateLayout

Plural = Literal["vmdisks", "disksnapshots", "vmdiskclasses"]
FINGERPRINT = "hostFingerprint"
APPLIED = "hostApplied"
_HOST_KEYS = (FINGERPRINT, APPLIED)


class CorruptObject(Exception):
    pass


def read_object(
    layout: StateLayout, plural: Plural, namespace: str, name: str
) -> dict[str, Any] | None:
    """The object file's JSON (host keys included), or None when there is none."""
    path = layout.object_file(plural, namespace, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise CorruptObject(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptObject(f"{path}: not a JSON object")
    return data


def without_host_keys(data: dict[str, Any]) -> dict[str, Any]:
    """The object alone."""
    return {k: v for k, v in data.items() if k not in _HOST_KEYS}


def class_version(layout: StateLayout, name: str) -> str:
    """The stored class's uid and generation (no validation), or "none" when there is none."""
    data = read_object(layout, "vmdiskclasses", CLUSTER_SCOPE, name)
    if data is None:
        return "none"
    meta = data.get("metadata")
    return f"{meta.get('uid')}:{meta.get('generation')}" if isinstance(meta, dict) else "?"


def document_digest(doc: Any) -> str | None:
    """A digest of a manifest document as data, or None for data JSON cannot tell apart
    (keys that are not strings, timestamps): two documents with one digest are equal."""
    return _digest(_canonical(doc)) if _plain_json(doc) else None


def applied_stamp(document: str, data: dict[str, Any]) -> str:
    """``hostApplied`` for the document of digest ``document`` stored as ``data``."""
    stored = {k: v for k, v in data.items() if k != "status" and k not in _HOST_KEYS}
    return _digest(f"{document}\n{_canonical(stored)}")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _plain_json(value: Any) -> bool:
    # Iterative: a document may nest MAX_DEPTH deep.  bool is an int: both stay apart in JSON.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return False
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif item is not None and not isinstance(item, (str, int, float)):
            return False
    return True
