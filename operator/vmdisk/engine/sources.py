"""What a new disk is made from: an image, a blank, another disk or a snapshot of one."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..api.vmdisk import ImageSource, VMDisk
from ..backends.base import BaseImage, Blank, Content, DiskRef, FromDisk, FromImage, FromStore
from ..backends.registry import Registry
from ..errors import DependencyNotReady, SourceNotAllowed
from ..images.cache import ImageCache
from ..images.policy import SourcePolicy
from ..images.source import redact
from .ports import Lookup


@dataclass(frozen=True)
class ResolvedSource:
    content: Content
    minimum: int  # the smallest size the new disk may have
    holds: str | None = None  # the source VMDisk to hold still (locked) while copying


def resolve_source(
    disk: VMDisk,
    lookup: Lookup,
    *,
    cache: ImageCache,
    registry: Registry,
    ref_of: Callable[[VMDisk], DiskRef],
    policy: SourcePolicy,
    progress: Callable[[int, int | None], None] | None = None,
) -> ResolvedSource:
    """Turn ``spec.source`` into backend content; images are fetched and checked here.

    Images must be what the disk's class allows (``policy``).
    """
    source = disk.spec.source
    if source.image is not None:
        check_image_source(source.image, policy)
    if source.image is not None and source.image.url.startswith("rbd://"):
        # Already in the backend's store: the backend clones it (and checks its size)
        # with the class's own Ceph identity, whose caps bound what it may read.
        return ResolvedSource(FromStore(source.image.url), 0)
    if source.image is not None:
        image = cache.get(
            source.image, disk_size=disk.spec.size_bytes, progress=progress, policy=policy
        )
        return ResolvedSource(FromImage(image), image.virtual_size)
    if source.blank is not None:
        return ResolvedSource(Blank(source.blank.filesystem), 0)
    return _copy_of(disk, lookup, cache, registry, ref_of)


def check_image_source(image: ImageSource, policy: SourcePolicy) -> None:
    """The class's checksum rule and its allowed hosts for the URL itself.

    Redirect hops and the addresses a name resolves to are checked by the
    downloader; file:// roots by the cache (``policy.file_dirs``).
    """
    if policy.require_checksum and image.checksum is None:
        raise SourceNotAllowed(
            "spec.source.image.checksum: the disk's class requires a sha256 checksum"
        )
    parts = urlsplit(image.url)
    if parts.scheme not in ("http", "https") or policy.allowed_hosts is None:
        return
    host = (parts.hostname or "").lower().rstrip(".")
    if not any(_host_matches(host, entry) for entry in policy.allowed_hosts):
        raise SourceNotAllowed(
            f"spec.source.image.url: {redact(image.url)} is not on a host the disk's class "
            f"allows ({', '.join(policy.allowed_hosts) or 'none'})"
        )


def _host_matches(host: str, entry: str) -> bool:
    entry = entry.lower().rstrip(".")
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        if entry.startswith("*."):
            return host.endswith(entry[1:]) and len(host) > len(entry) - 1
        return host == entry
    try:
        return ipaddress.ip_address(host.strip("[]")) in network
    except ValueError:
        return False  # a name: only a name entry matches it here


def _copy_of(
    disk: VMDisk,
    lookup: Lookup,
    cache: ImageCache,
    registry: Registry,
    ref_of: Callable[[VMDisk], DiskRef],
) -> ResolvedSource:
    """``source.disk`` or ``source.snapshot``: a copy of another disk (or of its snapshot)."""
    namespace = disk.metadata.namespace
    snapshot_name: str | None = None
    if disk.spec.source.disk is not None:
        source_name = disk.spec.source.disk.name
    else:
        assert disk.spec.source.snapshot is not None
        wanted = disk.spec.source.snapshot.name
        snap = lookup.get_snapshot(namespace, wanted)
        if snap is None or snap.status is None or not snap.status.ready_to_use:
            raise DependencyNotReady(
                f"spec.source.snapshot: DiskSnapshot {wanted!r} is not ready to use yet"
            )
        source_name, snapshot_name = snap.spec.disk_name, snap.status.snapshot_name
    source = lookup.get_disk(namespace, source_name)
    if source is None or source.status is None or source.status.phase != "Ready":
        raise DependencyNotReady(f"source VMDisk {source_name!r} is not Ready yet")
    assert source.status.backend is not None
    backend = registry.get(source.status.backend)
    source_ref = ref_of(source)
    state = backend.state(source_ref)
    if state is None:
        raise DependencyNotReady(f"source VMDisk {source_name!r} has no data on this node")
    # A copy keeps sharing the source's cached base where the backend can (qcow2 -B).
    base: BaseImage | None = cache.lookup(state.base_image) if state.base_image else None
    readable = backend.readable(source_ref, snapshot_name)
    return ResolvedSource(FromDisk(readable, base), state.virtual_size, holds=source_name)
