"""Pydantic models of the vmdisk.io API and CRD generation.  No I/O."""

from .common import API_VERSION, GROUP, VERSION, Condition, ObjectMeta, dump, set_condition
from .quantity import format_bytes, parse_bytes
from .snapshot import DiskSnapshot, DiskSnapshotSpec, DiskSnapshotStatus
from .vmdisk import VMDisk, VMDiskSpec, VMDiskStatus

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
