"""Whether a re-applied VMDisk can be left alone: the fast paths of a no-op apply.

A Ready disk whose stored object ``apply`` left unchanged needs no reconcile
when nothing it was reconciled against has moved since: its files (a
``stat`` of the disk's directory and of each file in it: the data and the
backend's record beside it), its class (uid and generation), the settings
and this code's version.  The last full reconcile stores that as a fingerprint beside the
status; a re-apply computes a fresh one and skips the engine when they agree.

Only what a stat can vouch for gets a fingerprint: a Ready disk held in a
plain file, in a directory of plain files, whose allocation is what its
status says.  Shared stores (RBD), block devices (LVM: a resize keeps the
device node as it was), nested directories, refused changes and a file that
already disagrees with its status (a guest writing) get none, and are
reconciled in full every time.

A re-apply of the very documents last applied (``objectfiles``: the record
beside each object) whose disks all keep their fingerprints is known to
change nothing before any model is built: ``unchanged_batch`` answers it
from the files alone, and the command is as cheap as a ``get``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..config import Settings
from ..layout import OutsideStateDir, StateLayout
from .documents import Document, with_namespace
from .objectfiles import (
    APPLIED,
    FINGERPRINT,
    CorruptObject,
    applied_stamp,
    class_version,
    document_digest,
    read_object,
    without_host_keys,
)


def around(settings: Settings) -> str:
    """What every fingerprint includes: a new version or new settings reconcile all."""
    return f"{__version__}\n{settings!r}"


def fingerprint(
    data: dict[str, Any], around: str, class_version: Callable[[str], str]
) -> str | None:
    """The fingerprint of a disk (its JSON, camelCase) under ``around`` and its class.

    None when it cannot have one (see above).
    """
    meta, status = data.get("metadata") or {}, data.get("status")
    if (
        not isinstance(status, dict)
        or status.get("phase") != "Ready"
        or status.get("shared")
        or not isinstance(path := status.get("path"), str)
        or not path
        or status.get("observedGeneration") != meta.get("generation")
        or any(c.get("type") == "ChangeRefused" for c in status.get("conditions") or [])
    ):
        return None
    pinned = (status.get("class") or {}).get("name")  # status.class: the pinned class
    version = class_version(pinned) if isinstance(pinned, str) else "none"
    directory, _, name = path.rpartition("/")
    data_seen = False
    try:
        seen = [_stamp(".", os.lstat(directory))]
        with os.scandir(directory) as entries:
            for entry in entries:  # in the directory's order: it is unchanged, or so is mtime
                found = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(found.st_mode):
                    return None
                if entry.name == name:
                    if found.st_blocks * 512 != status.get("actualSize"):
                        return None
                    data_seen = True
                seen.append(_stamp(entry.name, found))
    except OSError:
        return None
    if not data_seen:
        return None
    seen.append(f"{meta.get('uid')}:{status.get('observedGeneration')}")
    return hashlib.sha256("\n".join([around, version, *seen]).encode()).hexdigest()


def unchanged_batch(
    documents: Sequence[Document], settings: Settings, namespace: str | None
) -> list[dict[str, Any]] | None:
    """The stored objects (JSON) of a re-apply that changes nothing, or None if it may.

    Every document must be a VMDisk's, the one last applied to its stored
    object (which is as it was stored then), and its disk must keep its
    fingerprint.  Any doubt answers None: the full apply then decides, and
    reports what is wrong.
    """
    layout = StateLayout(settings.state_dir)
    context = around(settings)
    version = functools.cache(functools.partial(class_version, layout))  # read once each
    found = []
    for _, doc in documents:
        data = _stored_as_applied(layout, doc, namespace)
        # No fingerprint never matches: e.g. stored, then killed before its first reconcile.
        recorded = data.get(FINGERPRINT) if data is not None else None
        if data is None or not isinstance(recorded, str):
            return None
        if recorded != fingerprint(data, context, version):
            return None
        found.append(without_host_keys(data))
    return found


def _stored_as_applied(
    layout: StateLayout, doc: Any, namespace: str | None
) -> dict[str, Any] | None:
    """The stored object (JSON) that ``doc`` (under ``apply -n namespace``) was last
    applied to, unchanged since."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or doc.get("kind") != "VMDisk":
        return None
    name, given = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not isinstance(given, str | None):
        return None
    if namespace is not None and given not in (None, namespace):
        return None  # an error the full apply reports
    digest = document_digest(with_namespace(doc, namespace))
    if digest is None:
        return None
    try:
        data = read_object(layout, "vmdisks", namespace or given or "default", name)
    except (OSError, CorruptObject, OutsideStateDir):
        return None
    if data is None or data.get(APPLIED) != applied_stamp(digest, data):
        return None
    return data


def _stamp(name: str, info: os.stat_result) -> str:
    return (
        f"{name}:{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_blocks}:"
        f"{info.st_mtime_ns}:{info.st_ctime_ns}"
    )
