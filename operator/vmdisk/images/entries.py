"""The image cache's entries as they lie on disk: listing, metadata, locks, pruning.

Nothing here fetches, so ``vmdisk cache list`` and ``cache prune`` load only
this module (every command pays its imports at start-up); ``ImageCache``
fetches and verifies on top of it.  The layout is described in ``cache``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..host.files import fsync_dir
from ..host.headers import backing_files
from ..host.locks import LockTimeout, file_lock

log = logging.getLogger("vmdisk.images")

ENTRY_ID = re.compile(r"^sha256-[0-9a-f]{64}$")
_MAP_KEY = re.compile(r"^(url|layer)-[0-9a-f]{64}$")
_MAPS = ("urls", "layers")


class CacheObserver(Protocol):
    """Told about cache use and fetches (the operator's metrics)."""

    def cache_lookup(self, hit: bool) -> None: ...

    def image_fetched(self, scheme: str, size: int, seconds: float) -> None: ...


class _NoCacheObserver:
    def cache_lookup(self, hit: bool) -> None:
        pass

    def image_fetched(self, scheme: str, size: int, seconds: float) -> None:
        pass


NO_CACHE_OBSERVER: CacheObserver = _NoCacheObserver()


@dataclass(frozen=True)
class CacheEntry:
    id: str
    path: Path
    format: str
    virtual_size: int
    size: int  # bytes allocated on disk
    last_used: float
    source_url: str | None
    in_use: bool
    source_kind: str | None = None  # https, file, https+xz, ...; None for old entries


@dataclass(frozen=True)
class EntryMeta:
    """What ``sha256-<hex>.json`` says of a verified entry."""

    format: str
    virtual_size: int
    source_url: str | None
    source_kind: str | None


class CacheEntries:
    """The complete entries, URL and layer maps and per-entry locks under ``root``."""

    def __init__(self, root: Path, tmp_dir: Path | None = None) -> None:
        self.root = root
        self.tmp_dir = tmp_dir if tmp_dir is not None else root / "tmp"

    def meta(self, image_id: str) -> EntryMeta | None:
        """The entry's metadata, or None unless both its image and its metadata are in place."""
        if not ENTRY_ID.match(image_id) or not (self.root / image_id).is_file():
            return None
        try:
            meta = json.loads((self.root / f"{image_id}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        fmt, size, url = meta.get("format"), meta.get("virtual_size"), meta.get("source_url")
        if fmt not in ("raw", "qcow2") or not isinstance(size, int):
            return None
        url = url if isinstance(url, str) else None
        kind = meta.get("source_kind")
        if not isinstance(kind, str):  # entries made before the kind was recorded
            kind = url.partition(":")[0].lower() if url and ":" in url else None
        return EntryMeta(str(fmt), size, url, kind)

    def read_map(self, kind: str, key: str) -> str | None:
        """The entry id a URL (``urls``) or registry layer (``layers``) key maps to."""
        try:
            image_id = (self.root / kind / key).read_text().strip()
        except OSError:
            return None
        return image_id if ENTRY_ID.match(image_id) else None

    def lock(self, key: str, *, timeout: float | None = None) -> AbstractContextManager[None]:
        """The flock of one entry (or URL or layer key): one fetch of an image per node."""
        return file_lock(self.root / "locks" / f"{key}.lock", timeout=timeout)

    def in_use(self, image_dirs: Iterable[Path]) -> set[str]:
        """Ids of the entries that images under ``image_dirs`` name as backing files.

        Read from the images' headers, never from records: a disk whose
        record is lost, half-made disks and exports keep their base.
        """
        root = Path(os.path.realpath(self.root))
        named = backing_files(image_dirs)
        return {p.name for p in named if p.parent == root and ENTRY_ID.match(p.name)}

    def entries(self, in_use: set[str]) -> list[CacheEntry]:
        """Every complete entry; ``in_use`` holds ids that disks use as backing files."""
        found = []
        for path in sorted(self.root.glob("sha256-*.json")):
            image_id = path.name.removesuffix(".json")
            meta = self.meta(image_id)
            if meta is None:
                continue
            try:
                stat = os.stat(self.root / image_id)
            except FileNotFoundError:
                continue
            found.append(
                CacheEntry(
                    id=image_id,
                    path=self.root / image_id,
                    format=meta.format,
                    virtual_size=meta.virtual_size,
                    size=stat.st_blocks * 512,
                    last_used=stat.st_mtime,
                    source_url=meta.source_url,
                    in_use=image_id in in_use,
                    source_kind=meta.source_kind,
                )
            )
        return found

    def prune(self, max_age: float, in_use: set[str]) -> list[CacheEntry]:
        """Remove entries not in ``in_use`` and unused for over ``max_age`` seconds.

        Stale partial downloads, half-placed entries and dangling URL mappings
        of the same age go too.  Entries busy in another call are skipped.
        """
        cutoff = time.time() - max_age
        removed = []
        for entry in self.entries(in_use):
            if entry.in_use or entry.last_used >= cutoff:
                continue
            with suppress(LockTimeout), self.lock(entry.id, timeout=0.0):
                # Re-read under the lock: a concurrent get may have just used it.
                if os.stat(entry.path).st_mtime >= cutoff:
                    continue
                (self.root / f"{entry.id}.json").unlink()
                entry.path.unlink()
                removed.append(entry)
                log.info("pruned cached image %s (%s)", entry.id, entry.source_url)
        self._prune_leftovers(cutoff, in_use)
        if removed:
            fsync_dir(self.root)
        return removed

    def _prune_leftovers(self, cutoff: float, in_use: set[str]) -> None:
        candidates = [(p, p.name.split(".")[0]) for p in self.root.glob("sha256-*")]
        if self.tmp_dir.is_dir():
            candidates += [(p, p.name.split(".")[0]) for p in self.tmp_dir.iterdir()]
        for path, key in candidates:
            if key in in_use or not (ENTRY_ID.match(key) or _MAP_KEY.match(key)):
                continue
            with suppress(LockTimeout, FileNotFoundError), self.lock(key, timeout=0.0):
                if path.parent == self.root and self.meta(key) is not None:
                    continue  # complete entry, handled by prune itself
                if os.stat(path).st_mtime < cutoff:
                    path.unlink()
        for kind in _MAPS:
            maps = self.root / kind
            for mapping in maps.iterdir() if maps.is_dir() else ():
                image_id = self.read_map(kind, mapping.name)
                if image_id is None or self.meta(image_id) is None:
                    mapping.unlink(missing_ok=True)
