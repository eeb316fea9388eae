"""Pydantic models of the vmdisk.io API and CRD generation.  No I/O."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .common import API_VERSION, GROUP, VERSION, Condition, ObjectMeta, dump, set_condition
    from .quantity import format_bytes, parse_bytes
    from .snapshot import DiskSnapshot, DiskSnapshotSpec, DiskSnapshotStatus
    from .vmdisk import VMDisk, VMDiskSpec, VMDiskStatus

# Loaded on first use: importing a plain constant of vmdisk.api (the CLI's help)
# must not build every model.
_HOMES = {
    **dict.fromkeys(
        ("API_VERSION", "GROUP", "VERSION", "Condition", "ObjectMeta", "dump", "set_condition"),
        "common",
    ),
    **dict.fromkeys(("format_bytes", "parse_bytes"), "quantity"),
    **dict.fromkeys(("DiskSnapshot", "DiskSnapshotSpec", "DiskSnapshotStatus"), "snapshot"),
    **dict.fromkeys(("VMDisk", "VMDiskSpec", "VMDiskStatus"), "vmdisk"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{home}"), name)


__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "DiskSnapshot",
    "DiskSnapshotSpec",
    "DiskSnapshotStatus",
    "ObjectMeta",
    "VMDisk",
    "VMDiskSpec",
    "VMDiskStatus",
    "dump",
    "format_bytes",
    "parse_bytes",
    "set_condition",
]
