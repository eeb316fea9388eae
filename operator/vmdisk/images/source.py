"""Image sources: which URLs the cache may read, and from where.

Only ``http(s)://`` and ``file://`` are handled here.  A ``file://`` source
must resolve (symlinks followed) to a regular file under one of the allowed
image directories, so a manifest cannot make the agent read host files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import DownloadFailed, SourceNotAllowed

HTTP_SCHEMES = frozenset({"http", "https"})


@dataclass(frozen=True)
class HttpSource:
    url: str


@dataclass(frozen=True)
class FileSource:
    url: str
    path: Path  # resolved, inside an allowed image directory


Source = HttpSource | FileSource


def redact(url: str) -> str:
    """The URL without credentials or query string, fit for logs and metadata.

    Query strings often carry signed tokens (presigned object-store URLs).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_source(url: str, image_dirs: tuple[Path, ...]) -> Source:
    """Classify ``url``; raise SourceNotAllowed for anything the cache must not read."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in HTTP_SCHEMES:
        if not parts.hostname:
            raise SourceNotAllowed(f"image URL {redact(url)!r} has no host")
        return HttpSource(url)
    if scheme == "file":
        return FileSource(url, _allowed_file(parts.netloc, unquote(parts.path), image_dirs))
    raise SourceNotAllowed(
        f"{scheme}:// image sources are not handled by the image cache; "
        "use http://, https:// or file:// (under an allowed image directory)"
    )


def check_redirect(origin: str, target: str) -> None:
    """Allow only http(s) -> http(s) redirects (never e.g. to file://)."""
    scheme = urlsplit(target).scheme.lower()
    if scheme not in HTTP_SCHEMES:
        raise SourceNotAllowed(
            f"{redact(origin)} redirected to a {scheme or 'relative'}:// URL; "
            "only redirects to http:// or https:// are followed"
        )


def _allowed_file(netloc: str, path: str, image_dirs: tuple[Path, ...]) -> Path:
    if netloc not in ("", "localhost"):
        raise SourceNotAllowed(f"file:// URL names a remote host {netloc!r}")
    allowed = ", ".join(str(d) for d in image_dirs) or "none configured (VMDISK_IMAGE_DIRS)"
    if not path.startswith("/"):
        raise SourceNotAllowed(f"file:// URL needs an absolute path, got {path!r}")
    # Resolve before checking, so a symlink inside an allowed directory
    # cannot point the agent at /etc/shadow.
    real = Path(path).resolve()
    if not any(real.is_relative_to(d.resolve()) for d in image_dirs):
        raise SourceNotAllowed(f"file {path} is outside the allowed image directories: {allowed}")
    if not real.exists():
        raise DownloadFailed(f"image file {path} does not exist")
    if not real.is_file():
        raise SourceNotAllowed(f"image file {path} is not a regular file")
    return real
