"""File primitives: atomic writes, cleanup on error, sparse-aware copies."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..errors import HostIOError, InsufficientSpace, VMDiskError
from .safeopen import ensure_dir, open_dir

_FICLONE = 0x40049409  # ioctl(FICLONE): share extents (btrfs, xfs reflink=1)
_CHUNK = 16 * 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to stable storage."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Begin writing a just-written range to disk without waiting for it.

    A later fsync then has little left to do: writing and flushing overlap.
    """
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def atomic_write(
    path: Path,
    data: bytes | str,
    mode: int = 0o644,
    *,
    sweep: bool = True,
    sync_dir: bool = True,
) -> None:
    """Write ``path`` so that readers see the old or the new content, never half.

    ``sweep`` removes this target's temp files left by dead writers first; a
    caller writing many files into one directory passes False and calls
    ``remove_stale_temps`` on the directory once instead (a sweep per write
    lists the whole directory each time).

    The content is on stable storage before the rename; ``sync_dir`` False
    leaves the rename itself to the caller's later ``fsync_dir`` (one for a
    batch of writes into one directory): until then a power loss may bring
    back the old content, whole.
    """
    payload = data.encode() if isinstance(data, str) else data
    try:
        ensure_dir(path.parent)  # no planted symlink on the way (UnsafePath)
    except OSError as exc:
        raise_if_no_space(exc)
        raise
    if sweep:
        _remove_stale_temps(path.parent, f".{path.name}.tmp-")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with suppress(FileNotFoundError):
            tmp.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        if sync_dir:
            fsync_dir(path.parent)
    except OSError as exc:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise_if_no_space(exc)
        raise


@dataclass(frozen=True)
class FileCopy:
    """A small file held in memory: its length and its data extents (the rest are holes)."""

    size: int
    extents: tuple[tuple[int, bytes], ...]


def read_copy(path: Path, limit: int) -> FileCopy | None:
    """``path`` as a FileCopy, or None when it holds more than ``limit`` bytes of data."""
    with open(path, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        extents: list[tuple[int, bytes]] = []
        held = 0
        for start, end in _data_ranges(fd, size):
            held += end - start
            if held > limit:
                return None
            extents.append((start, os.pread(fd, end - start, start)))
    return FileCopy(size, tuple(extents))


def write_copy(path: Path, copy: FileCopy, mode: int = 0o644) -> None:
    """Create ``path`` (never an existing one) holding ``copy``, flushed to stable storage."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
        try:
            for offset, data in copy.extents:
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], offset + written)
            os.ftruncate(fd, copy.size)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise_if_no_space(exc)
        raise


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (never an existing one) holding ``data``, flushed to stable storage."""
    write_copy(path, FileCopy(len(data), ((0, data),) if data else ()), mode)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of ``[0, size)`` that hold data (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        if start >= size:  # data past ``size`` (a longer file) is not asked for
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def remove_stale_temps(directory: Path) -> None:
    """Every atomic_write temp file in ``directory`` whose writer died (kill -9, power loss)."""
    _remove_stale_temps(directory, ".")


def _remove_stale_temps(directory: Path, prefix: str) -> None:
    try:
        entries = [e.name for e in os.scandir(directory) if e.name.startswith(prefix)]
    except FileNotFoundError:
        return
    for name in entries:
        stem, _, pid = name.rpartition("-")
        if stem.endswith(".tmp") and pid.isdigit() and not _alive(int(pid)):
            with suppress(FileNotFoundError):
                (directory / name).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_error(exc: OSError) -> VMDiskError:
    """An OSError as a typed error: full disks are InsufficientSpace, the rest HostIOError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({exc.filename})" if exc.filename else ""
        return InsufficientSpace(f"no space left on the state directory's filesystem{where}")
    return HostIOError(f"{exc.strerror or exc} ({exc.filename or 'no file'})")


def raise_if_no_space(exc: OSError) -> None:
    """Turn ENOSPC/EDQUOT into the typed, retryable InsufficientSpace."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise host_error(exc) from exc


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree; missing is fine.

    Refuses (UnsafePath) when a parent is a planted symlink, which would
    make the removal land outside the state directory.
    """
    try:
        os.close(open_dir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there to remove
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


@contextmanager
def remove_on_error(path: Path) -> Iterator[Path]:
    """Yield ``path``; if the block fails, remove whatever it half-made there."""
    try:
        yield path
    except BaseException:
        remove_path(path)
        raise


def allocated_bytes(path: Path) -> int:
    """Bytes actually allocated on disk (sparse files count only their data)."""
    if path.is_dir():
        return sum(allocated_bytes(p) for p in path.iterdir())
    return os.stat(path).st_blocks * 512


def try_reflink(source: Path, target: Path) -> bool:
    """Clone ``source`` into a new ``target`` sharing extents; False if unsupported."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        return _reflink_fd(src.fileno(), dst.fileno())


def _reflink_fd(sfd: int, dfd: int) -> bool:
    try:
        fcntl.ioctl(dfd, _FICLONE, sfd)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
            return False
        raise


def sparse_copy(source: Path, target: Path) -> str:
    """Copy a file keeping holes; returns the method used (reflink or sparse)."""
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            return sparse_copy_fd(src.fileno(), dst.fileno(), os.fstat(src.fileno()).st_size)
    except OSError as exc:
        raise_if_no_space(exc)
        raise


def sparse_copy_fd(sfd: int, dfd: int, size: int) -> str:
    """Copy ``size`` bytes between open files keeping holes; returns reflink or sparse.

    Tries a reflink first (instant on xfs/btrfs), else copies only the data
    extents found with SEEK_DATA/SEEK_HOLE, each with copy_file_range so
    the kernel moves the bytes (and may share extents itself).  ``dfd``
    must be a new, empty file.
    """
    try:
        if _reflink_fd(sfd, dfd):
            os.fsync(dfd)
            return "reflink"
        os.ftruncate(dfd, size)
        for start, end in _data_ranges(sfd, size):
            _copy_range(sfd, dfd, start, end)
        os.fsync(dfd)
        return "sparse"
    except OSError as exc:
        raise_if_no_space(exc)
        raise


def _copy_range(sfd: int, dfd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        count = min(_CHUNK, end - pos)
        try:
            copied = os.copy_file_range(sfd, dfd, count, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            copied = os.pwrite(dfd, os.pread(sfd, count, pos), pos)
        if copied == 0:
            break
        start_writeback(dfd, pos, copied)
        pos += copied


def allocate(path: Path, size: int, *, zero_fill: bool) -> None:
    """Preallocate ``size`` bytes: fallocate, or write zeroes for ``full``.

    ``full`` writes zeroes into the holes only: the data already in the file
    (a copied image, a fresh filesystem) is never touched.
    """
    try:
        with open(path, "r+b") as handle:
            fd = handle.fileno()
            if zero_fill:
                for start, end in _holes(fd, size):
                    _write_zeroes(fd, start, end)
            else:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
    except OSError as exc:
        raise_if_no_space(exc)
        raise


def _holes(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of ``[0, size)`` that hold no data (beyond the end counts as a hole)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # at or past the end: all hole
                raise
            start = pos
        if start >= size:
            return
        try:
            end = min(os.lseek(fd, start, os.SEEK_DATA), size)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no data after the hole
                raise
            end = size
        yield start, end
        pos = end


def _write_zeroes(fd: int, start: int, end: int) -> None:
    block = bytes(4 * 1024 * 1024)
    pos = start
    while pos < end:
        pos += os.pwrite(fd, block[: min(len(block), end - pos)], pos)
