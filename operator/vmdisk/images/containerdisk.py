"""Taking the disk file out of a containerDisk layer (a tar: plain, gzip'd or zstd'd).

KubeVirt's convention: the layer holds exactly one regular file in
``disk/``, a raw or qcow2 image.  Only that file's bytes are written, to a
file this module names itself; nothing else in the tar reaches the disk, and
no tar path is ever used as a path.  A member that could mean something
outside a plain file tree (``..``, an absolute path, a link, a device, a
FIFO) refuses the whole layer, as does a second disk file.

Bounds: every byte read from the (decompressed) tar counts against
``limit``, so a gzip bomb stops there; no single read (a pax or long-name
header) may ask for more than a few MiB; the deadline is checked per read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import time
import zlib
from contextlib import suppress
from pathlib import Path
from typing import IO, Protocol

import zstandard

from ..errors import ContainerDiskInvalid, DownloadFailed, ImageCorrupt, ImageTooLarge, ImageUnsafe
from .fetchbounds import Digest, Progress

_CHUNK = 1024 * 1024
_BLOCK = 64 * 1024
_ZEROES = bytes(_BLOCK)
_MAX_READ = 8 * 1024 * 1024  # larger than any header a real layer has, and than _CHUNK
_MAX_MEMBERS = 10_000  # tarfile keeps each TarInfo; a real containerDisk has ~3
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_ZSTD_MAX_WINDOW = 1 << 27  # 128 MiB, zstd's own default decoder limit: bounded memory
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Bounded(io.RawIOBase):
    """A forward-reading view of the decompressed tar that enforces the bounds."""

    def __init__(self, inner: _Reader, name: str, limit: int, deadline: float) -> None:
        self.inner = inner
        self.name = name
        self.limit = limit
        self.deadline = deadline
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        """Exactly ``size`` bytes unless the stream ends (the inner one may read short)."""
        if size < 0 or size > _MAX_READ:
            raise ImageUnsafe(
                f"image {self.name}: a tar header asks for {size} bytes at once; refusing the layer"
            )
        self._check(self.position + size)
        data = self.inner.read(size)
        if len(data) < size and data:
            parts = [data]
            got = len(data)
            while got < size and (more := self.inner.read(size - got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self.position + offset
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self.position:
            # tarfile reads in order; going back would mean decompressing twice.
            raise ImageCorrupt(f"image {self.name}: the layer's tar is not in stream order")
        while self.position < target:
            if not self.read(min(_CHUNK, target - self.position)):  # skipped, never written
                break
        return self.position

    def _check(self, upto: int) -> None:
        if upto > self.limit:
            raise ImageTooLarge(
                f"image {self.name}: the layer's tar is larger than the {self.limit} bytes "
                "this disk may unpack (a decompression bomb, or an image too large for the disk)"
            )
        if time.monotonic() > self.deadline:
            raise DownloadFailed(
                f"image {self.name}: unpacking the layer did not finish within the fetch deadline"
            )


class _Inflate:
    """gzip, decompressed in large steps (GzipFile reads its source 8 KiB at a time).

    zlib checks each member's CRC; concatenated members are read as one stream.
    """

    def __init__(self, source: _Reader) -> None:
        self.source = source
        self.zlib = zlib.decompressobj(wbits=31)
        self.pending = b""  # compressed bytes not yet fed

    def read(self, size: int = -1, /) -> bytes:
        size = _CHUNK if size < 0 else size
        while True:
            if self.zlib.eof:
                rest = self.zlib.unused_data + self.pending
                self.pending = rest or self.source.read(_CHUNK)
                if not self.pending:
                    return b""
                self.zlib = zlib.decompressobj(wbits=31)
            data = self.zlib.unconsumed_tail or self.pending or self.source.read(_CHUNK)
            self.pending = b""
            if not data:
                raise EOFError("the gzip stream ends inside a member")
            out = self.zlib.decompress(data, size)
            if out:
                return out


class _Prefixed:
    """``source`` with its first bytes (read to sniff the compression) put back."""

    def __init__(self, head: bytes, source: _Reader) -> None:
        self.head, self.source = head, source

    def read(self, size: int = -1, /) -> bytes:
        if not self.head:
            return self.source.read(size)
        cut = len(self.head) if size < 0 else size
        data, self.head = self.head[:cut], self.head[cut:]
        return data


def extract_disk(
    layer: _Reader,
    out: Path,
    *,
    name: str,
    limit: int,
    deadline: float,
    progress: Progress | None = None,
) -> Digest:
    """Write the one ``disk/<file>`` of the layer read from ``layer`` to ``out``.

    Returns the disk file's sha256 and size.  ``out`` is created here (never
    followed if planted) and removed again on any failure.  Raises
    ImageUnsafe, ContainerDiskInvalid, ImageTooLarge or ImageCorrupt.
    """
    with suppress(FileNotFoundError):
        out.unlink()
    try:
        head = b""
        while len(head) < 4 and (more := layer.read(4 - len(head))):
            head += more
        raw = _Prefixed(head, layer)
        inner: _Reader = raw
        if head.startswith(_GZIP):
            inner = _Inflate(raw)
        elif head.startswith(_ZSTD):
            zstd = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
            inner = zstd.stream_reader(raw, read_size=_CHUNK)  # type: ignore[arg-type]
        return _walk(_Bounded(inner, name, limit, deadline), out, name, limit, progress)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
        _remove(out)
        raise ImageCorrupt(f"image {name}: the layer is not a readable tar: {exc}") from None
    except BaseException:
        _remove(out)
        raise


def _walk(stream: _Bounded, out: Path, name: str, limit: int, progress: Progress | None) -> Digest:
    found: list[str] = []
    digest: Digest | None = None
    with tarfile.open(fileobj=stream, mode="r:") as tar:
        for count, member in enumerate(tar, 1):
            path = _checked_path(member, name)
            if count > _MAX_MEMBERS:
                raise ContainerDiskInvalid(f"image {name}: more than {_MAX_MEMBERS} tar members")
            if member.isdir():
                continue
            if not member.isreg() or member.issparse():
                raise ImageUnsafe(
                    f"image {name}: tar member {path!r} is a {_kind(member)}; a containerDisk "
                    "holds plain files only"
                )
            parts = path.split("/")
            if len(parts) != 2 or parts[0] != "disk":
                continue  # any other file: read past, never written
            found.append(path)
            if len(found) > 1:
                raise ContainerDiskInvalid(
                    f"image {name} holds several disk files ({', '.join(found)}); "
                    "a containerDisk holds exactly one in disk/"
                )
            if member.size > limit:
                raise ImageTooLarge(
                    f"image {name}: {path} is {member.size} bytes, over the {limit} bytes "
                    "this disk may hold"
                )
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            digest = _copy(source, out, member.size, progress)
    if digest is None:
        raise ContainerDiskInvalid(
            f"image {name} holds no disk file: a containerDisk has one raw or qcow2 file in disk/"
        )
    return digest


def _checked_path(member: tarfile.TarInfo, name: str) -> str:
    """The member's path, normalised; ``..``, absolute and NUL paths refuse the layer."""
    raw = member.name
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if raw.startswith("/") or ".." in parts or "\0" in raw or "\\" in raw:
        raise ImageUnsafe(
            f"image {name}: tar member {raw!r} points outside the layer; refusing the layer"
        )
    return "/".join(parts)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    return f"member of type {member.type!r}"


def _copy(source: IO[bytes], out: Path, size: int, progress: Progress | None) -> Digest:
    """Copy ``size`` bytes, hashing them and leaving holes for zero blocks."""
    hasher = hashlib.sha256()
    done = 0
    fd = os.open(out, _CREATE, 0o600)
    with os.fdopen(fd, "r+b") as handle:
        while chunk := source.read(_CHUNK):
            hasher.update(chunk)
            view = memoryview(chunk)
            run = 0  # start of the pending run of data blocks
            for start in range(0, len(view), _BLOCK):
                block = view[start : start + _BLOCK]
                zero = block == _ZEROES if len(block) == _BLOCK else not any(block)
                if zero:  # a hole: write the run before it
                    if run < start:
                        os.pwrite(fd, view[run:start], done + run)
                    run = start + _BLOCK
            if run < len(view):
                os.pwrite(fd, view[run:], done + run)
            done += len(chunk)
            if progress is not None:
                progress(done, size)
        handle.truncate(done)
    if done != size:
        raise ImageCorrupt(f"the layer's tar ends inside its disk file ({done} of {size} bytes)")
    return Digest(hasher.hexdigest(), done)


def _remove(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()
