"""Whether some process holds QEMU's image lock on a file or block device.

QEMU (and ``qemu-img``) lock the images they open with OFD locks on single
bytes: byte ``100 + n`` for each permission ``n`` it holds (read, write,
resize ...) and byte ``200 + n`` for each it refuses to share.  A running VM
therefore always holds a read lock somewhere in those ranges.

The probe asks the kernel with ``F_OFD_GETLK`` whether an exclusive lock on
those ranges *would* conflict, which takes no lock at all: QEMU is never
disturbed, and closing the probe's descriptor cannot drop anybody's lock
(OFD locks belong to their own open file description).  The kernel does not
say who holds an OFD lock (``l_pid`` is -1), so the answer is only yes/no.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

_PERM_BASE = 100  # QEMU's RAW_LOCK_PERM_BASE
_SHARED_BASE = 200  # QEMU's RAW_LOCK_SHARED_BASE
_PERM_BITS = 64  # one byte per permission bit of a uint64_t mask
# struct flock on Linux/x86_64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid, padded to 32 bytes.
_FLOCK = "@hhqqi4x"


def qemu_lock_held(path: Path) -> bool:
    """True when a process holds a QEMU image lock on ``path`` (missing paths: False)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return False
    try:
        return any(_conflicts(fd, base) for base in (_PERM_BASE, _SHARED_BASE))
    finally:
        os.close(fd)


def _conflicts(fd: int, start: int) -> bool:
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, _PERM_BITS, 0)
    reply = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
    lock_type = struct.unpack(_FLOCK, reply)[0]
    return bool(lock_type != fcntl.F_UNLCK)
