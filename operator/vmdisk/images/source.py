"""Image sources: which URLs the cache may read, and from where.

``http(s)://``, ``file://`` and registry references (``oci://``, ``docker://``,
see ``reference``) are handled here.  A ``file://`` source
names a path under one of the policy's image directories; nothing is looked
up on disk until ``open_file`` opens it once, with no symlink followed in
any component, so what is checked is what is copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import DownloadFailed, SourceNotAllowed, UnsafePath
from ..host.safeopen import components, open_beneath
from .policy import SourcePolicy
from .reference import REGISTRY_SCHEMES, Reference, parse_reference

HTTP_SCHEMES = frozenset({"http", "https"})


@dataclass(frozen=True)
class HttpSource:
    url: str


@dataclass(frozen=True)
class FileSource:
    url: str
    root: Path  # the allowed image directory it lies under
    relative: str  # its path below ``root``, plain components only

    @property
    def shown(self) -> str:
        return f"{self.root}/{self.relative}"


@dataclass(frozen=True)
class OciSource:
    url: str
    reference: Reference


Source = HttpSource | FileSource | OciSource


def redact(url: str) -> str:
    """The URL without credentials or query string, fit for logs and metadata.

    Query strings often carry signed tokens (presigned object-store URLs).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", "")).replace("\0", "\\0")


def parse_source(url: str, policy: SourcePolicy, *, has_checksum: bool) -> Source:
    """Classify ``url``; raise SourceNotAllowed for anything the policy does not allow.

    Lexical only: hosts are checked (resolved) when they are connected to.
    """
    if "\0" in url or any(c in url for c in "\r\n"):
        raise SourceNotAllowed(
            f"spec.source.image.url: {redact(url)!r} contains a NUL or newline character"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in REGISTRY_SCHEMES:
        ref = parse_reference(url)
        if policy.require_checksum and not has_checksum and ref.digest is None:
            raise SourceNotAllowed(
                "spec.source.image: the disk's class requires a checksum for every image; "
                "name the image by digest (@sha256:<hex>) or give a checksum"
            )
        return OciSource(url, ref)
    if policy.require_checksum and not has_checksum:
        raise SourceNotAllowed(
            "spec.source.image.checksum: the disk's class requires a checksum for every image"
        )
    if scheme in HTTP_SCHEMES:
        if not parts.hostname:
            raise SourceNotAllowed(f"image URL {redact(url)!r} has no host")
        return HttpSource(url)
    if scheme == "file":
        return _file_source(url, parts.netloc, unquote(parts.path), policy.file_dirs)
    raise SourceNotAllowed(
        f"{scheme}:// image sources are not handled by the image cache; use http://, "
        "https://, oci:// or file:// (under an allowed image directory)"
    )


def check_redirect(origin: str, target: str) -> None:
    """Allow only http(s) -> http(s) redirects (never e.g. to file://)."""
    scheme = urlsplit(target).scheme.lower()
    if scheme not in HTTP_SCHEMES:
        raise SourceNotAllowed(
            f"{redact(origin)} redirected to {redact(target)!r}, a {scheme or 'relative'}:// "
            "URL; only redirects to http:// or https:// are followed"
        )


def open_file(src: FileSource) -> int:
    """Open a file source once, read-only, with no symlink in any component."""
    try:
        return open_beneath(src.root, src.relative, os.O_RDONLY | os.O_NONBLOCK)
    except UnsafePath as exc:
        raise SourceNotAllowed(f"image file {src.shown}: {exc.message}") from None
    except FileNotFoundError:
        raise DownloadFailed(f"image file {src.shown} does not exist") from None
    except NotADirectoryError:
        raise SourceNotAllowed(f"image file {src.shown}: a parent is not a directory") from None


def _file_source(url: str, netloc: str, path: str, image_dirs: tuple[Path, ...]) -> FileSource:
    if netloc not in ("", "localhost"):
        raise SourceNotAllowed(f"file:// URL names a remote host {netloc!r}")
    allowed = ", ".join(str(d) for d in image_dirs) or "none configured (VMDISK_IMAGE_DIRS)"
    if not path.startswith("/"):
        raise SourceNotAllowed(f"file:// URL needs an absolute path, got {path!r}")
    try:
        parts = components(path.lstrip("/"))
    except UnsafePath as exc:
        raise SourceNotAllowed(f"file:// URL: {exc.message}") from None
    for root in image_dirs:
        prefix = root.parts[1:]
        if tuple(parts[: len(prefix)]) == prefix and len(parts) > len(prefix):
            return FileSource(url, root, "/".join(parts[len(prefix) :]))
    raise SourceNotAllowed(f"file {path} is outside the allowed image directories: {allowed}")
