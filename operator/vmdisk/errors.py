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


class ChangeRefused(InvalidSpec):
    """A change to an existing disk that is refused; the disk itself stays as it was.

    Not a failure of the disk: it stays Ready (a VM may be using it) and a
    separate ``ChangeRefused`` condition says what was refused.
    """


class UnstartableDevice(ChangeRefused):
    """libvirt settings QEMU will not start: a new disk fails, a Ready one keeps its XML."""


class ShrinkNotSupported(ChangeRefused):
    reason = "ShrinkNotSupported"


class ImmutableField(ChangeRefused):
    reason = "ImmutableField"


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


class DecompressedTooLarge(ImageError):
    """A compressed image expands past what its disk may hold (a decompression bomb)."""

    reason = "DecompressedTooLarge"


class DecompressionFailed(ImageError):
    """A compressed image's stream is corrupt, truncated or followed by other data."""

    reason = "DecompressionFailed"


class SourceNotAllowed(ImageError):
    reason = "SourceNotAllowed"


class DownloadFailed(TemporaryError):
    reason = "DownloadFailed"


class ContainerDiskInvalid(ImageError):
    """A registry image that is not a containerDisk: one layer holding one ``disk/<file>``."""

    reason = "ContainerDiskInvalid"


class RegistryAuthFailed(TemporaryError):
    """The registry refused the pull: no credentials, wrong ones, or no access.

    Retried (slowly): an administrator may fix the class's credentials Secret.
    """

    reason = "RegistryAuthFailed"

    def __init__(self, message: str, *, reason: str | None = None, delay: float = 60.0) -> None:
        super().__init__(message, reason=reason, delay=delay)


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


class UnsafeName(PermanentError):
    """A name outside a host tool's own grammar never reaches that tool."""

    reason = "UnsafeName"


# VMDiskClass refusals (the trust boundary between tenants and administrators).
class ClassNotFound(TemporaryError):
    """The disk's class (or a default class) does not exist (yet); retried like a PVC's."""

    reason = "ClassNotFound"

    def __init__(self, message: str, *, reason: str | None = None, delay: float = 30.0) -> None:
        super().__init__(message, reason=reason, delay=delay)


class InvalidClass(PermanentError):
    """The class's spec does not validate against its backend's own model."""

    reason = "InvalidClass"


class ClassNotAllowed(PermanentError):
    """The class names something this node's settings do not allow (a VG, a ceph.conf, a user)."""

    reason = "ClassNotAllowed"


class ExceedsClassLimit(ChangeRefused):
    """The disk asks for more than its class allows (size, iotune).

    A new disk is Failed; a Ready one stays Ready and unchanged (ChangeRefused).
    """

    reason = "ExceedsClassLimit"


class UnsafePath(PermanentError):
    """A path component is a symbolic link (or ``..``) where none may be: nothing was written."""

    reason = "UnsafePath"


class DiskExists(PermanentError):
    """Data of this name exists but was not made for this disk (another backend, or unowned)."""

    reason = "DiskExists"


class FormatConflict(PermanentError):
    """The data found for this disk has another format than its spec asks; it is left untouched."""

    reason = "FormatConflict"


class BackendUnavailable(PermanentError):
    """The node cannot serve the backend: not configured, or its kernel lacks what it needs.

    E.g. no device-mapper driver or thin-pool target for ``lvm``.  Permanent
    until an administrator fixes the node and the object is touched again.
    """

    reason = "BackendUnavailable"


class ThinPoolUnsafe(PermanentError):
    """The LVM thin pool does not zero new blocks, so a disk could read another's old data."""

    reason = "ThinPoolUnsafe"
