"""Where everything lives under the state directory.  Pure path logic.

Every path vmdisk writes is built here from validated names, and checked to
stay inside the state directory, so nothing is ever written outside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

NAME_MAX = 255  # bytes per path component on every Linux filesystem we run on
_PARTIAL = ".partial"
# Cluster-scoped objects live under a directory no namespace can be called.
CLUSTER_SCOPE = "_cluster"


class OutsideStateDir(ValueError):
    pass


@dataclass(frozen=True)
class StateLayout:
    root: Path

    def _inside(self, *parts: str) -> Path:
        # Lexical check: each part must be one plain path component.  Names
        # are validated Kubernetes names already; this is the last line.
        if any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
            raise OutsideStateDir(f"{'/'.join(parts)!r} would leave the state directory")
        return self.root.joinpath(*(_fit(p) for p in parts))

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def cache_tmp(self) -> Path:
        return self.root / "cache" / "tmp"

    @property
    def disks_dir(self) -> Path:
        return self.root / "disks"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    def disk_dir(self, namespace: str, name: str) -> Path:
        return self._inside("disks", namespace, name)

    def partial_disk_dir(self, namespace: str, name: str) -> Path:
        """Where a disk is built before being renamed into place."""
        return self._inside("disks", namespace, f".{name}{_PARTIAL}")

    @staticmethod
    def disk_name_of(entry: str) -> str:
        """The disk an entry of ``disks/<namespace>/`` belongs to (partials included)."""
        if entry.startswith(".") and entry.endswith(_PARTIAL) and len(entry) > len(_PARTIAL) + 1:
            return entry[1 : -len(_PARTIAL)]
        return entry

    def lock(self, *parts: str) -> Path:
        return self._inside("locks", "-".join(parts) + ".lock")

    def object_file(self, plural: str, namespace: str, name: str) -> Path:
        return self._inside("objects", plural, namespace, f"{name}.json")

    def objects_dir(self, plural: str) -> Path:
        return self._inside("objects", plural)

    def has_objects(self, plural: str, namespace: str | None) -> bool:
        """Whether any object of ``plural`` is stored (in ``namespace``, or in any)."""
        if namespace is not None:
            found = self._inside("objects", plural, namespace).glob("*.json")
        else:
            found = self.objects_dir(plural).glob("*/*.json")
        return next(found, None) is not None

    def export_file(self, namespace: str, name: str, fmt: str) -> Path:
        return self._inside("exports", namespace, f"{name}.{fmt}")


def _fit(part: str) -> str:
    """``part`` itself, or a unique shortening when it exceeds NAME_MAX bytes.

    A valid 253-character VMDisk name plus a suffix (``.json``, a lock's
    namespace prefix) does not fit in one component; the digest of the
    whole keeps shortened names distinct, the kept tail keeps the suffix.
    """
    raw = part.encode()
    if len(raw) <= NAME_MAX:
        return part
    digest = hashlib.sha256(raw).hexdigest()[:32]
    return f"{raw[:160].decode(errors='ignore')}~{digest}~{raw[-40:].decode(errors='ignore')}"
