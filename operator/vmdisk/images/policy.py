"""What a disk may read: the image-source policy of its class.

Built by the engine from ``VMDiskClass.spec.imageSources``, bounded by the
agent's Settings (``engine/classes.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourcePolicy:
    """What a disk's class lets it read.

    From VMDiskClass.spec.imageSources, bounded by Settings.
    """

    allowed_hosts: tuple[str, ...] | None = None  # host names and CIDRs; None = any public address
    file_dirs: tuple[Path, ...] = ()  # file:// roots (already intersected with settings)
    require_checksum: bool = False
