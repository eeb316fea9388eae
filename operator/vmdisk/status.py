"""Pure status builders shared by the disk and snapshot reconcilers."""

from __future__ import annotations

from typing import TypeVar

from .api.common import Condition, set_condition
from .api.snapshot import DiskSnapshotStatus
from .api.vmdisk import VMDiskStatus
from .errors import VMDiskError

S = TypeVar("S", VMDiskStatus, DiskSnapshotStatus)


def with_condition(status: S, condition: Condition, *, drop: str | None = None) -> S:
    """``status`` with ``condition`` set (and the condition type ``drop`` removed)."""
    conditions = set_condition(status.conditions, condition)
    if drop is not None:
        conditions = [c for c in conditions if c.type != drop]
    return status.model_copy(update={"conditions": conditions})


def failed_status(status: S, generation: int | None, exc: VMDiskError) -> S:
    """Status for an error.

    Permanent errors turn the object Failed until its spec changes.  A
    temporary one leaves a Ready object Ready (its data is still usable) and
    anything else Pending, and says it will be retried.
    """
    message = exc.message if exc.permanent else f"{exc.message} (will retry)"
    status = with_condition(
        status,
        Condition(
            type="Ready",
            status="False",
            reason=exc.reason,
            message=message,
            observed_generation=generation,
        ),
        drop="Progressing",
    )
    if exc.permanent:
        phase = "Failed"
    elif status.phase == "Ready":
        phase = "Ready"
    else:
        phase = "Pending"
    return status.model_copy(update={"phase": phase, "observed_generation": generation})
