"""Who has a disk open: the one place that decides whether a disk is in use.

Two kinds of evidence, asked in this order:

1. the running domains of the node's libvirtd whose live XML names the disk
   (they can be named, and asked to do online operations);
2. the backend's own evidence of any other opener: QEMU's image lock on a
   file or device (any QEMU or qemu-img, whoever started it), RBD watchers and
   lock owners.

Offline-only operations call ``require_offline`` and wait (``DiskInUse``) while
either says the disk is open; growing asks ``holder`` and goes online through
libvirt when the holder is a domain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..backends.base import DiskBackend, DiskRef, SupportsHolders
from ..errors import DiskInUse
from ..host.domains import DomainDisk, Hypervisor, HypervisorUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """What has a disk open."""

    description: str  # for messages: "domain 'web' (target vda)", "a process holding ..."
    domains: tuple[DomainDisk, ...] = ()  # the node's libvirtd domains that hold it


def holder(backend: DiskBackend, ref: DiskRef, hypervisor: Hypervisor | None) -> Holder | None:
    """The disk's holder, or None when nothing has it open."""
    unreachable = ""
    if hypervisor is not None:
        location = backend.location(ref)
        try:
            if location.type == "network":
                assert location.protocol is not None
                domains = hypervisor.disks_using(network=(location.protocol, location.path))
            else:
                domains = hypervisor.disks_using(paths=[location.path])
        except HypervisorUnavailable as exc:
            # The image locks below still see any QEMU; only naming it is lost.
            log.warning("%s: %s", ref, exc.message)
            domains, unreachable = [], f"; {exc.message}"
        if domains:
            return Holder(", ".join(str(d) for d in domains), tuple(domains))
    if isinstance(backend, SupportsHolders):
        others = backend.holders(ref)
        if others:
            what = ", ".join(others)
            if hypervisor is not None:
                what += f", not a domain of {hypervisor.uri}{unreachable}"
            return Holder(what)
    return None


def require_offline(
    backend: DiskBackend, ref: DiskRef, hypervisor: Hypervisor | None, operation: str
) -> None:
    """Raise ``DiskInUse`` (nothing changed) while anything has the disk open."""
    found = holder(backend, ref, hypervisor)
    if found is not None:
        raise in_use(found, ref, operation)


def in_use(found: Holder, ref: DiskRef, operation: str) -> DiskInUse:
    """The error for an ``operation`` that must wait for ``found`` to let go."""
    return DiskInUse(
        f"disk {ref} is in use by {found.description}; {operation} waits until it is "
        "released (stop the VM or detach the disk)"
    )
