"""Opening and creating paths without following symbolic links.

Used for every path whose components someone else could swap: ``file://``
image sources inside an image directory, and the agent's own state
directory (root-owned, but not trusted blindly).  Where the kernel has
``openat2`` (Linux 5.6+) one call resolves the whole path with
``RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS``; elsewhere each component is opened
with ``O_NOFOLLOW`` relative to its parent's descriptor.  Either way the
caller gets a descriptor, so what was checked is what is read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from contextlib import suppress
from pathlib import Path

from ..errors import UnsafePath

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "ppc64le": 437, "s390x": 437}.get(platform.machine())
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works: bool | None = None if _SYS_OPENAT2 is not None else False


def components(relative: str) -> list[str]:
    """Plain path components of ``relative``; refuses ``..``, NUL and absolute paths."""
    if "\0" in relative:
        raise UnsafePath(f"path {relative!r} contains a NUL byte")
    if relative.startswith("/"):
        raise UnsafePath(f"path {relative!r} must be relative")
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"path {relative!r} climbs out with '..'")
    return parts


def open_beneath(root: Path, relative: str, flags: int = os.O_RDONLY) -> int:
    """Open ``root/relative`` with no symlink in any component below ``root``.

    ``root`` itself is opened without following symlinks in any of its own
    components either (Settings resolves configured roots once at start).
    Raises UnsafePath on a symlink or ``..``; other OSErrors pass through.
    """
    parts = components(relative)
    rootfd = open_dir(root)
    try:
        return _open_at(rootfd, parts, flags | os.O_NOFOLLOW | os.O_CLOEXEC, f"{root}/{relative}")
    finally:
        os.close(rootfd)


def open_dir(path: Path, *, create: bool = False, mode: int = 0o700) -> int:
    """A descriptor for directory ``path``, walking from ``/`` without following links.

    With ``create`` the missing directories are made (``mode``).
    """
    if not path.is_absolute():
        path = path.absolute()
    found = _open_dir_at_once(path)
    if found is not None:
        return found
    fd = os.open("/", _DIR_FLAGS)
    for part in path.parts[1:]:
        fd = _step(fd, part, path, create=create, mode=mode)  # consumes the parent's fd
    return fd


def _open_dir_at_once(path: Path) -> int | None:
    """``path`` opened by one openat2 refusing every symlink, or None: walk it instead.

    The walk below gives the same answer in one syscall per component; it
    also creates what is missing and names the offending component, so any
    failure here (missing, a link, no openat2) is left to it.
    """
    global _openat2_works
    if _openat2_works is False:
        return None
    how = _OpenHow(flags=_DIR_FLAGS, mode=0, resolve=_RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    raw = os.fsencode(path)
    fd = _libc.syscall(_SYS_OPENAT2, _AT_FDCWD, raw, ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        _openat2_works = True
        return int(fd)
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:
        _openat2_works = False  # old kernel or a seccomp filter
    return None


def ensure_dir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` and its missing parents; refuse when any component is a symlink."""
    os.close(open_dir(path, create=True, mode=mode))


def _step(parent: int, part: str, whole: Path, *, create: bool, mode: int) -> int:
    """Open directory ``part`` of ``parent`` (closed either way), never through a link."""
    try:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with suppress(FileExistsError):  # made concurrently; opened (and checked) below
                os.mkdir(part, mode, dir_fd=parent)
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(parent, part):
            raise UnsafePath(f"{whole}: component {part!r} is a symbolic link") from None
        raise
    finally:
        os.close(parent)


def _is_link(parent: int, part: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_at(rootfd: int, parts: list[str], flags: int, shown: str) -> int:
    global _openat2_works
    if not parts:
        return os.dup(rootfd)
    if _openat2_works is not False:
        resolve = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
        how = _OpenHow(flags=flags, mode=0, resolve=resolve)
        path = "/".join(parts).encode()
        fd = _libc.syscall(_SYS_OPENAT2, rootfd, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            _openat2_works = True
            return int(fd)
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:
            _openat2_works = False  # old kernel or a seccomp filter: walk instead
        elif err in (errno.ELOOP, errno.EXDEV):
            raise UnsafePath(f"{shown}: a component is a symbolic link")
        else:
            raise OSError(err, os.strerror(err), shown)
    fd = os.dup(rootfd)
    for part in parts[:-1]:
        try:
            fd = _step(fd, part, Path(shown), create=False, mode=0)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), shown) from None
    try:
        return os.open(parts[-1], flags, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(fd, parts[-1])):
            raise UnsafePath(f"{shown}: {parts[-1]!r} is a symbolic link") from None
        raise OSError(exc.errno, exc.strerror, shown) from None
    finally:
        os.close(fd)
