"""The typed error hierarchy shared by every layer.

Every user-visible failure carries a CamelCase ``reason`` (it becomes the
condition reason) and a message a person can act on.  Permanent errors stop
retrying until the spec changes; temporary ones are retried with backoff.
"""

from __future__ import annotations


class VMDiskError(Exception):
    """Base of all errors the engine reports to users."""

    reason: str = "InternalError"
    permanent: bool = True

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class PermanentError(VMDiskError):
    """Retrying will not help until the spec (or the image) changes."""

    permanent = True


class TemporaryError(VMDiskError):
    """Worth retrying later: network, locks, busy storage."""

    permanent = False
    reason = "TemporaryFailure"

    def __init__(self, message: str, *, reason: str | None = None, delay: float = 10.0) -> None:
        super().__init__(message, reason=reason)
        self.delay = delay


class InvalidSpec(PermanentError):
    reason = "InvalidSpec"


class ShrinkNotSupported(PermanentError):
    reason = "ShrinkNotSupported"


class UnsupportedOperation(PermanentError):
    reason = "Unsupported"


class DependencyNotReady(TemporaryError):
    """A source disk or snapshot this object needs is not ready yet."""

    reason = "WaitingForDependency"


class HasDependents(TemporaryError):
    """Deletion refused while snapshots or clones still depend on the disk."""

    reason = "HasDependents"


class DiskInUse(TemporaryError):
    """A running VM (or another process) has the disk open; retried once it lets go.

    Offline-only operations (restore, snapshot copies, deletion) wait; nothing
    is changed meanwhile.
    """

    reason = "DiskInUse"

    def __init__(self, message: str, *, delay: float = 15.0) -> None:
        super().__init__(message, delay=delay)


class DiskMissing(PermanentError):
    reason = "DiskMissing"


class DiskCorrupt(PermanentError):
    """The disk's data on the host does not carry the format pinned at its creation."""

    reason = "DiskCorrupt"


# Image refusals: each has its own reason so users can tell them apart.
class ImageError(PermanentError):
    reason = "ImageInvalid"


class ChecksumMismatch(ImageError):
    reason = "ChecksumMismatch"


class ImageFormatMismatch(ImageError):
    reason = "ImageFormatMismatch"


class ImageFormatUnsupported(ImageError):
    reason = "ImageFormatUnsupported"


class ImageUnsafe(ImageError):
    reason = "ImageUnsafe"


class ImageLargerThanDisk(ImageError):
    reason = "ImageLargerThanDisk"


class ImageTooLarge(ImageError):
    reason = "ImageTooLarge"


class ImageCorrupt(ImageError):
    reason = "ImageCorrupt"


class SourceNotAllowed(ImageError):
    reason = "SourceNotAllowed"


class DownloadFailed(TemporaryError):
    reason = "DownloadFailed"


class HostIOError(TemporaryError):
    """An unexpected operating-system error on the host (I/O, permissions)."""

    reason = "HostIOError"


class InsufficientSpace(TemporaryError):
    """The state directory's filesystem is full; retried once space is freed."""

    reason = "InsufficientSpace"


class InsufficientCapacity(PermanentError):
    """The backend's storage (an LVM volume group, a thin pool) cannot hold the disk.

    Permanent until the spec changes (a smaller size, another volume group)
    or an administrator adds capacity and the object is touched again.
    """

    reason = "InsufficientCapacity"


class UnsafePath(PermanentError):
    """A path component is a symbolic link (or ``..``) where none may be: nothing was written."""

    reason = "UnsafePath"


class DiskExists(PermanentError):
    """Data of this name exists but was not made for this disk (another backend, or unowned)."""

    reason = "DiskExists"


class FormatConflict(PermanentError):
    """The data found for this disk has another format than its spec asks; it is left untouched."""

    reason = "FormatConflict"
