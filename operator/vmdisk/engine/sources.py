"""What a new disk is made from: an image, a blank, another disk or a snapshot of one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..api.vmdisk import VMDisk
from ..backends.base import (
    BaseImage,
    Blank,
    Content,
    DiskBackend,
    DiskRef,
    FromDisk,
    FromImage,
    FromStore,
)
from ..backends.registry import Registry
from ..errors import DependencyNotReady
from ..images.cache import ImageCache
from ..images.policy import SourcePolicy
from ..images.reference import REGISTRY_SCHEMES
from .ports import Lookup

if TYPE_CHECKING:
    from ..images.registry import RegistryAuth


@dataclass(frozen=True)
class ResolvedSource:
    content: Content
    minimum: int  # the smallest size the new disk may have
    holds: str | None = None  # the source VMDisk to hold still (locked) while copying
    # The source disk when the copy reads its live data (not a separate snapshot
    # volume): nothing else may have it open meanwhile.
    live: tuple[DiskBackend, DiskRef] | None = None
    image_digest: str | None = None  # what an oci:// reference resolved to


def resolve_source(
    disk: VMDisk,
    lookup: Lookup,
    *,
    cache: ImageCache,
    registry: Registry,
    ref_of: Callable[[VMDisk], DiskRef],
    policy: SourcePolicy,
    progress: Callable[[int, int | None], None] | None = None,
    registry_auth: Callable[[], RegistryAuth | None] = lambda: None,
) -> ResolvedSource:
    """Turn ``spec.source`` into backend content; images are fetched and checked here.

    ``policy`` is what the disk's class lets it read,
    checked by the cache at every hop and on cache hits; ``registry_auth``
    reads the class's registry credentials, asked only for registry images.
    """
    source = disk.spec.source
    if source.image is not None and source.image.url.startswith("rbd://"):
        # Already in the backend's store: the backend clones it (and checks its size)
        # with the class's own Ceph identity, whose caps bound what it may read.
        return ResolvedSource(FromStore(source.image.url), 0)
    if source.image is not None:
        pulled = source.image.url.partition("://")[0] in REGISTRY_SCHEMES
        image = cache.get(
            source.image,
            disk_size=disk.spec.size_bytes,
            progress=progress,
            policy=policy,
            registry_auth=registry_auth() if pulled else None,
        )
        return ResolvedSource(
            FromImage(image), image.virtual_size, image_digest=image.source_digest
        )
    if source.blank is not None:
        return ResolvedSource(Blank(source.blank.filesystem), 0)
    return _copy_of(disk, lookup, cache, registry, ref_of)


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
    # qcow2 internal snapshots live inside the disk's own file.
    live = snapshot_name is None or readable.snapshot is not None
    return ResolvedSource(
        FromDisk(readable, base),
        state.virtual_size,
        holds=source_name,
        live=(backend, source_ref) if live else None,
    )
