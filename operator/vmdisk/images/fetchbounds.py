"""What a fetch may take and what it yields: limits, options, the digest.

Apart from the HTTP code (``download``), so that what only names them — the
engine being wired, a cache hit — loads no HTTP client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings
from ..errors import ImageTooLarge
from .policy import HopCheck

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Digest:
    """What was fetched: its sha256 and size, and what it decompressed to, if it did."""

    sha256: str
    size: int
    compression: str | None = None  # gzip, xz, zstd, bzip2
    decoded_size: int | None = None


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one fetch (one reconcile's worth of attempts); see Settings."""

    timeout: float = 60.0  # connect and per-read timeout
    retries: int = 5
    deadline: float = 4 * 3600.0  # every attempt of one fetch together
    min_rate: int = 64 * 1024  # bytes per second, averaged over rate_window
    rate_window: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        return cls(
            timeout=settings.fetch_timeout,
            deadline=settings.fetch_deadline,
            min_rate=settings.fetch_min_rate,
            rate_window=settings.fetch_rate_window,
        )


@dataclass(frozen=True)
class HttpOptions:
    limits: FetchLimits
    max_bytes: int  # stop an endless or oversized body early
    hops: HopCheck  # the source policy, checked at every hop
    # Sent to the first URL's origin only, never to a redirect target on another
    # host (a registry's bearer token must not reach the object store it redirects to).
    origin_headers: tuple[tuple[str, str], ...] = ()


def over_fetch_limit(subject: str, max_bytes: int) -> ImageTooLarge:
    """The refusal of a fetch past ``max_bytes``; ``subject`` says what went over."""
    return ImageTooLarge(
        f"{subject} the {max_bytes} bytes this disk may fetch "
        "(its size plus a margin for image metadata)"
    )


def max_fetch_bytes(disk_size: int | None, max_virtual_size: int) -> int:
    """The most bytes a fetch may bring for a disk of ``disk_size`` (None: size from the image).

    An image's file exceeds its virtual size only by its metadata (qcow2:
    L1/L2 and refcount tables, ~1/6000 at 64 KiB clusters, more with small
    clusters or an internal snapshot), so 1/16 plus 16 MiB is generous and
    still stops an endless body within a few percent of the disk.
    """
    virtual = min(disk_size, max_virtual_size) if disk_size is not None else max_virtual_size
    return virtual + virtual // 16 + 16 * 1024 * 1024
