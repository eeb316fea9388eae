"""Base images: sources, download with checksum and resume, safety checks, the cache."""

from .cache import CacheEntry, ImageCache

__all__ = ["CacheEntry", "ImageCache"]
