"""The node-local, content-addressed cache of verified base images.

Layout under ``root``::

    sha256-<hex>        the verified image, read-only (0444)
    sha256-<hex>.json   its metadata; an entry counts only when both exist
    tmp/<key>.part      partial downloads (resumable), never used as images
    urls/url-<sha256>   maps a URL given without checksum to the entry id
    layers/layer-<hex>  maps a registry layer digest to the entry of its disk file
    locks/<key>.lock    flock per entry (or per URL): one download per image

Every entry passed the safety checks in ``inspect`` before it was renamed
into place; its mtime is the last time a disk was made from it (touched on
every use, as Nova does) and drives ``prune`` (``entries``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..api.vmdisk import ImageSource
from ..backends.base import BaseImage
from ..errors import ChecksumMismatch, DownloadFailed, ImageFormatMismatch
from ..host.files import atomic_write, fsync_dir
from ..host.safeopen import ensure_dir
from .entries import NO_CACHE_OBSERVER, CacheEntries, CacheObserver
from .fetchbounds import Digest, FetchLimits, HttpOptions, Progress, max_fetch_bytes
from .inspect import check_size, inspect_image
from .policy import DEFAULT_CLUSTER_CIDRS, HopCheck, Resolver, SourcePolicy
from .source import FileSource, OciSource, Source, open_file, parse_source, redact

# The fetching code (HTTP client, registry, containerDisk unpacking) is imported
# by the fetch that needs it: a disk made from a cached image loads none of it.
if TYPE_CHECKING:
    from .registry import Layer, Platform, RegistryAuth, RegistryClient

log = logging.getLogger("vmdisk.images")

DEFAULT_LIMITS = FetchLimits()


class ImageCache:
    """Downloads, verifies and keeps base images; safe across threads and processes.

    ``tmp_dir`` must be on the same filesystem as ``root`` (entries are
    renamed into place).
    """

    def __init__(
        self,
        root: Path,
        *,
        policy: SourcePolicy,
        max_virtual_size: int,
        limits: FetchLimits = DEFAULT_LIMITS,
        cluster_cidrs: tuple[str, ...] = DEFAULT_CLUSTER_CIDRS,
        resolve: Resolver | None = None,
        tmp_dir: Path | None = None,
        observer: CacheObserver = NO_CACHE_OBSERVER,
        platform: Platform | None = None,
    ) -> None:
        self.root = root
        self.observer = observer
        self.policy = policy  # for disks whose class brings none
        self.max_virtual_size = max_virtual_size
        self.limits = limits
        self.cluster_cidrs = cluster_cidrs
        self.resolve = resolve
        self.index = CacheEntries(root, tmp_dir)
        self.tmp_dir = self.index.tmp_dir
        self.platform = platform  # what a multi-arch index is narrowed to (None: this host's)

    def get(
        self,
        source: ImageSource,
        *,
        disk_size: int | None,
        progress: Progress | None = None,
        policy: SourcePolicy | None = None,
        registry_auth: RegistryAuth | None = None,
    ) -> BaseImage:
        """Return the verified cached image for ``source``, fetching it once if needed.

        ``policy`` is the disk's class's image-source policy (default: the
        cache's, from Settings); it is checked even on a cache hit, so a
        disk never gets an image its class could not have fetched.
        ``registry_auth`` is the class's registry credentials (oci:// only).
        """
        policy = policy or self.policy
        src = parse_source(source.url, policy, has_checksum=source.checksum is not None)
        fetch = _Fetch(
            src,
            progress,
            HttpOptions(
                self.limits,
                max_fetch_bytes(disk_size, self.max_virtual_size),
                HopCheck(policy, self.cluster_cidrs, self.resolve),
            ),
        )
        name = redact(source.url)
        if isinstance(src, OciSource):
            from .registry import RegistryClient

            client = RegistryClient(
                src.reference,
                fetch.options,
                plain_http=src.reference.registry in policy.plain_http_registries,
                auth=registry_auth,
            )
            return self._get_oci(client, fetch, source, disk_size)
        if source.checksum is not None:
            expected = source.checksum.removeprefix("sha256:")
            image_id = f"sha256-{expected}"
            with self.index.lock(image_id):
                image = self.lookup(image_id)
                self.observer.cache_lookup(hit=image is not None)
                if image is None:
                    part = self._fetch(fetch, image_id, expected)
                    image = self._verify_and_place(part, image_id, source, disk_size)
                return self._use(image, source, disk_size)
        key = "url-" + hashlib.sha256(source.url.encode()).hexdigest()
        with self.index.lock(key):
            known = self.index.read_map("urls", key)
            with self.index.lock(known) if known else nullcontext():
                image = self.lookup(known) if known else None
                if image is not None:
                    self.observer.cache_lookup(hit=True)
                    return self._use(image, source, disk_size)
            self.observer.cache_lookup(hit=False)
            part = self._fetch(fetch, key, None)
            image_id = f"sha256-{part.digest.sha256}"
            with self.index.lock(image_id):
                image = self.lookup(image_id)
                if image is None:
                    image = self._verify_and_place(part, image_id, source, disk_size)
                else:
                    log.info("image %s is already cached as %s", name, image_id)
                    _remove_partial(part.path)
                atomic_write(self.root / "urls" / key, image_id)
                return self._use(image, source, disk_size)

    def _get_oci(
        self, client: RegistryClient, fetch: _Fetch, source: ImageSource, disk_size: int | None
    ) -> BaseImage:
        """A containerDisk: the manifest is resolved every time (tags move), the layer once.

        Entries are found by layer digest, so any number of tags, digests and
        disks that come to one layer share one pull per node.
        """
        from .registry import host_platform

        resolved = client.resolve(self.platform or host_platform())
        key = f"layer-{resolved.layer.hex}"
        with self.index.lock(key):
            known = self.index.read_map("layers", key)
            image = self.lookup(known) if known else None
            self.observer.cache_lookup(hit=image is not None)
            if image is not None:
                client.check_layer(resolved.layer)  # this repository, this login, serves it
            else:
                image = self._pull(client, fetch, key, resolved.layer, source, disk_size)
                atomic_write(self.root / "layers" / key, image.id)
            found = self._use(image, source, disk_size)
        return replace(found, source_digest=resolved.digest)

    def _pull(
        self,
        client: RegistryClient,
        fetch: _Fetch,
        key: str,
        layer: Layer,
        source: ImageSource,
        disk_size: int | None,
    ) -> BaseImage:
        """Stream the layer, unpacking its disk file on the way; verify and place that.

        One write of the bytes: the blob itself never reaches the disk.
        """
        from .containerdisk import extract_disk

        ensure_dir(self.tmp_dir)
        disk = self.tmp_dir / f"{key}.disk"
        name = redact(source.url)
        started = time.monotonic()
        stream = client.open_layer(layer, fetch.progress)
        try:
            digest = extract_disk(
                stream,
                disk,
                name=name,
                limit=fetch.options.max_bytes,
                deadline=started + self.limits.deadline,
            )
            stream.finish()  # the layer digest, before the disk file is used
        except BaseException:
            _remove_partial(disk)
            raise
        finally:
            stream.close()
        self.observer.image_fetched("oci", layer.size, time.monotonic() - started)
        expected = source.checksum.removeprefix("sha256:") if source.checksum else None
        if expected is not None and digest.sha256 != expected:
            _remove_partial(disk)
            raise ChecksumMismatch(
                f"image {name}: its disk file has sha256:{digest.sha256}, "
                f"expected sha256:{expected}"
            )
        image_id = f"sha256-{digest.sha256}"
        with self.index.lock(image_id):
            image = self.lookup(image_id)
            if image is not None:
                _remove_partial(disk)
                return image
            meta = {"layer_digest": layer.digest}
            part = _Part(disk, digest, "oci")
            return self._verify_and_place(part, image_id, source, disk_size, meta)

    def lookup(self, image_id: str) -> BaseImage | None:
        """The verified entry ``image_id``, or None when it is not (fully) cached."""
        meta = self.index.meta(image_id)
        if meta is None:
            return None
        return BaseImage(image_id, self.root / image_id, meta.format, meta.virtual_size)

    def _fetch(self, fetch: _Fetch, key: str, expected: str | None) -> _Part:
        """Fetch into tmp/<key>.part; a refused or broken fetch leaves no file.

        A compressed image is decompressed into tmp/<key>.image on the way
        (the fetched bytes stay in the partial only until it is complete).
        """
        from .download import copy_file, fetch_http

        ensure_dir(self.tmp_dir)
        path = self.tmp_dir / f"{key}.part"
        output = self.tmp_dir / f"{key}.image"
        started = time.monotonic()
        src, options = fetch.source, fetch.options
        try:
            if isinstance(src, FileSource):
                fd = open_file(src)
                try:
                    digest = copy_file(
                        fd,
                        src.shown,
                        path,
                        expected=expected,
                        max_bytes=options.max_bytes,
                        limits=options.limits,
                        progress=fetch.progress,
                        output=output,
                    )
                finally:
                    os.close(fd)
            else:
                digest = fetch_http(
                    src.url,
                    path,
                    expected=expected,
                    options=options,
                    progress=fetch.progress,
                    output=output,
                )
        except DownloadFailed:
            _remove_partial(output)  # remade from the kept partial on resume
            raise  # the partial stays for a later resume, or for prune
        except Exception:
            _remove_partial(path)
            _remove_partial(output)
            raise
        scheme = src.url.partition(":")[0].lower()
        self.observer.image_fetched(scheme, digest.size, time.monotonic() - started)
        kind = scheme if digest.compression is None else f"{scheme}+{digest.compression}"
        if digest.compression is None:
            _remove_partial(output)
            return _Part(path, digest, kind)
        _remove_partial(path)  # the compressed bytes: verified, decompressed, done with
        return _Part(output, digest, kind)

    def _verify_and_place(
        self,
        part: _Part,
        image_id: str,
        source: ImageSource,
        disk_size: int | None,
        extra: dict[str, str] | None = None,
    ) -> BaseImage:
        """Run the safety checks on the partial file, then rename it into the cache."""
        try:
            verified = inspect_image(
                part.path,
                name=redact(source.url),
                declared=source.format,
                max_virtual_size=self.max_virtual_size,
                disk_size=disk_size,
            )
            _seal(part.path)  # read-only, and durable: verified bytes survive a power loss
            os.replace(part.path, self.root / image_id)
            fsync_dir(self.root)
        except Exception:
            _remove_partial(part.path)
            raise
        _remove_partial(part.path)  # the resume sidecar
        meta = {
            "id": image_id,
            "format": verified.format,
            "virtual_size": verified.virtual_size,
            "source_url": redact(source.url),
            "source_kind": part.kind,
            "verified": time.time(),
            **(extra or {}),
        }
        atomic_write(self.root / f"{image_id}.json", json.dumps(meta, indent=1) + "\n")
        log.info("cached image %s as %s (%s)", redact(source.url), image_id, verified.format)
        return BaseImage(image_id, self.root / image_id, verified.format, verified.virtual_size)

    def _use(self, image: BaseImage, source: ImageSource, disk_size: int | None) -> BaseImage:
        """Per-use checks (the disk size varies per disk) and the use timestamp."""
        name = redact(source.url)
        if source.format is not None and source.format != image.format:
            raise ImageFormatMismatch(
                f"image {name} was declared {source.format} but is {image.format}"
            )
        check_size(
            image.virtual_size,
            name=name,
            max_virtual_size=self.max_virtual_size,
            disk_size=disk_size,
        )
        os.utime(image.path)
        return image


@dataclass(frozen=True)
class _Fetch:
    """What one ``get`` fetches, with its bounds and policy."""

    source: Source
    progress: Progress | None
    options: HttpOptions


@dataclass(frozen=True)
class _Part:
    """A fetched, hashed, not yet verified file in tmp/."""

    path: Path  # the image: the fetched bytes, or what they decompressed to
    digest: Digest  # of the fetched bytes
    kind: str  # the source kind: its scheme, plus "+<compression>"


def _seal(path: Path) -> None:
    """Make the verified file read-only and durable, without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o444)
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_partial(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + ".json")):
        with suppress(FileNotFoundError):
            leftover.unlink()
