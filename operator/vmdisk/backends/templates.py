"""Images qemu-img made, kept in memory to be copied instead of made again.

``qemu-img create`` writes the same bytes for the same arguments: the header
names the backing file and its format, never the new image itself, and holds
no time stamp or random id.  So the second qcow2 overlay of one base (or the
second blank qcow2 of one size) in a process is a copy of the first: no
``qemu-img`` process per disk, one write and one fsync instead of its five.
Only qemu-img ever decides the format's bytes; nothing here parses or builds
them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

from ..host.files import FileCopy, read_copy, write_copy

# An overlay of a 1 GiB disk holds 192 KiB; its L1 table grows with the size
# (1 MiB more at 64 TiB).  Larger images are made by qemu-img every time, and
# the kept copies stay under 16 MiB however large the disks.
TEMPLATE_LIMIT = 2 * 1024 * 1024
TEMPLATES_KEPT = 8


class ImageTemplates:
    """The last few images made, by the arguments they were made with (thread-safe)."""

    def __init__(self, kept: int = TEMPLATES_KEPT, limit: int = TEMPLATE_LIMIT) -> None:
        self._kept = kept
        self._limit = limit
        self._copies: OrderedDict[Hashable, FileCopy] = OrderedDict()
        self._making: dict[Hashable, threading.Lock] = {}  # one creator per key at a time
        self._lock = threading.Lock()  # _copies and _making

    def make(self, key: Hashable, path: Path, create: Callable[[Path], None]) -> None:
        """Write ``path`` as a copy of the image made for ``key``, else ``create`` it and keep it.

        ``path`` must not exist; either way its data is on stable storage when
        this returns.  Concurrent callers with one key wait for the first one's
        image rather than each running qemu-img.
        """
        with self._making_lock(key):
            copy = self._get(key)
            if copy is None:
                create(path)
                made = read_copy(path, self._limit)
                if made is not None:
                    self._put(key, made)
                else:
                    self._forget(key)  # too large to keep: qemu-img makes each one
                return
        write_copy(path, copy, mode=0o644)

    def _making_lock(self, key: Hashable) -> threading.Lock:
        with self._lock:
            return self._making.setdefault(key, threading.Lock())

    def _get(self, key: Hashable) -> FileCopy | None:
        with self._lock:
            copy = self._copies.get(key)
            if copy is not None:
                self._copies.move_to_end(key)
            return copy

    def _forget(self, key: Hashable) -> None:
        with self._lock:
            self._making.pop(key, None)

    def _put(self, key: Hashable, copy: FileCopy) -> None:
        with self._lock:
            self._copies[key] = copy
            while len(self._copies) > self._kept:
                old, _ = self._copies.popitem(last=False)
                self._making.pop(old, None)
