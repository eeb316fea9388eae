"""A class's limits applied to a disk's size and iotune.  Pure."""

from __future__ import annotations

from ..api.quantity import format_bytes
from ..api.vmdisk import IoTune
from ..api.vmdiskclass import ClassLimits
from ..errors import ExceedsClassLimit

_FAMILIES = (("BytesSec", "bytes_sec"), ("IopsSec", "iops_sec"))


def check_size(limits: ClassLimits, size: int, *, class_name: str) -> None:
    """Refuse a virtual size above the class's ``maxSize``."""
    largest = limits.max_size_bytes
    if largest is not None and size > largest:
        raise ExceedsClassLimit(
            f"spec.size: {format_bytes(size)} is larger than class {class_name!r} allows "
            f"(limits.maxSize: {limits.max_size})"
        )


def effective_iotune(asked: IoTune, limits: ClassLimits, *, class_name: str) -> IoTune:
    """The iotune the disk gets: what it asks within the limits, or the limits themselves.

    0 means unlimited, on both sides.  Per family (bytes, IOPS): a total
    limit caps a total request or the sum of a read and a write request; a
    read or write limit caps that direction.  A request that leaves a limited
    value unset gets the limit, so no class disk is ever faster than allowed.
    """
    if limits.iotune is None:
        return asked
    cap = limits.iotune
    values = asked.model_dump()
    for camel, suffix in _FAMILIES:
        total, read, write = (f"{d}_{suffix}" for d in ("total", "read", "write"))
        limit_total = getattr(cap, total)
        want_total, want_read, want_write = values[total], values[read], values[write]
        split = bool(want_read or want_write)
        if limit_total:
            if split:
                if not (want_read and want_write) or want_read + want_write > limit_total:
                    raise ExceedsClassLimit(
                        f"spec.libvirt.iotune: read{camel} + write{camel} must both be set and "
                        f"add up to at most {limit_total}, the class {class_name!r} limit "
                        f"total{camel}"
                    )
            elif not want_total or want_total > limit_total:
                if want_total > limit_total:
                    raise ExceedsClassLimit(
                        f"spec.libvirt.iotune.total{camel}: {want_total} is above the class "
                        f"{class_name!r} limit {limit_total}"
                    )
                values[total] = limit_total
        for direction in ("read", "write"):
            key = f"{direction}_{suffix}"
            limit = getattr(cap, key)
            if not limit:
                continue
            if values[total] and not split:
                raise ExceedsClassLimit(
                    f"spec.libvirt.iotune.total{camel}: class {class_name!r} limits "
                    f"{direction}{camel}; set read{camel}/write{camel} instead"
                )
            if values[key] > limit:
                raise ExceedsClassLimit(
                    f"spec.libvirt.iotune.{direction}{camel}: {values[key]} is above the class "
                    f"{class_name!r} limit {limit}"
                )
            values[key] = values[key] or limit
    return IoTune.model_validate(values)
