"""Whether a re-applied VMDisk can be left alone: the fast path of a no-op apply.

A Ready disk whose stored object ``apply`` left unchanged needs no reconcile
when nothing it was reconciled against has moved since: its files (a
``stat`` of the disk's directory and of each file in it: the data and the
backend's record beside it), its class (uid and generation), the settings
and this code's version.  The last full reconcile stores that as a fingerprint beside the
status; a re-apply computes a fresh one and skips the engine when they agree.

Only what a stat can vouch for gets a fingerprint: a Ready disk held in a
plain file, in a directory of plain files, whose allocation is what its
status says.  Shared stores (RBD), block devices (LVM: a resize keeps the
device node as it was), nested directories, refused changes and a file that
already disagrees with its status (a guest writing) get none, and are
reconciled in full every time.
"""

from __future__ import annotations

import hashlib
import os
import stat

from ..api.vmdisk import VMDisk


def fingerprint(disk: VMDisk, around: str) -> str | None:
    """The disk's fingerprint under ``around`` (what else its reconcile depended on).

    None when it cannot have one (see above).
    """
    status = disk.status
    if (
        status is None
        or status.phase != "Ready"
        or status.shared
        or not status.path
        or status.observed_generation != disk.metadata.generation
        or any(c.type == "ChangeRefused" for c in status.conditions)
    ):
        return None
    directory, _, name = status.path.rpartition("/")
    data_seen = False
    try:
        seen = [_stamp(".", os.lstat(directory))]
        with os.scandir(directory) as entries:
            for entry in entries:  # in the directory's order: it is unchanged, or so is mtime
                found = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(found.st_mode):
                    return None
                if entry.name == name:
                    if found.st_blocks * 512 != status.actual_size:
                        return None
                    data_seen = True
                seen.append(_stamp(entry.name, found))
    except OSError:
        return None
    if not data_seen:
        return None
    seen.append(f"{disk.metadata.uid}:{status.observed_generation}")
    return hashlib.sha256("\n".join([around, *seen]).encode()).hexdigest()


def _stamp(name: str, info: os.stat_result) -> str:
    return (
        f"{name}:{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_blocks}:"
        f"{info.st_mtime_ns}:{info.st_ctime_ns}"
    )
