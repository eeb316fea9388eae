"""Pure status builders shared by the disk and snapshot reconcilers."""

from __future__ import annotations

import time
from typing import TypeVar

from ..api.common import Condition, set_condition
from ..api.snapshot import DiskSnapshotStatus
from ..api.vmdisk import VMDiskStatus
from ..errors import VMDiskError
from .ports import Publish

S = TypeVar("S", VMDiskStatus, DiskSnapshotStatus)


def still_creating(status: VMDiskStatus | None) -> bool:
    """True while a disk may still read its source: neither Ready nor Failed yet.

    A Ready disk has its data; a Failed one stopped until its spec changes.
    Only the others hold their source (a disk, a snapshot) from deletion.
    """
    return status is None or status.phase not in ("Ready", "Failed")


def with_condition(status: S, condition: Condition, *, drop: str | tuple[str, ...] = ()) -> S:
    """``status`` with ``condition`` set (and the condition types ``drop`` removed)."""
    conditions = set_condition(status.conditions, condition)
    dropped = (drop,) if isinstance(drop, str) else drop
    conditions = [c for c in conditions if c.type not in dropped]
    return status.model_copy(update={"conditions": conditions})


def refused_status(status: S, generation: int | None, exc: VMDiskError) -> S:
    """A refused change to a Ready object: it stays Ready, a ``ChangeRefused`` condition says why.

    Kubernetes' convention for a change a controller will not make: the
    object's health is one condition, the refusal another, so that whoever
    waits for ``Ready`` (a VM controller) is not told a healthy disk failed.
    """
    status = with_condition(
        status,
        Condition(
            type="ChangeRefused",
            status="True",
            reason=exc.reason,
            message=f"{exc.message}; the disk is unchanged",
            observed_generation=generation,
        ),
        drop="Progressing",
    )
    return status.model_copy(update={"observed_generation": generation})


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


class ProgressPublisher:
    """Throttled progress: publishes ``status.progress`` at most every two seconds."""

    def __init__(self, status: VMDiskStatus, publish: Publish | None) -> None:
        self.status = status
        self.publish = publish
        self.last = 0.0

    def percent(self, value: float) -> None:
        now = time.monotonic()
        if self.publish is None or (now - self.last < 2.0 and value < 100):
            return
        self.last = now
        self.publish(self.status.model_copy(update={"progress": f"{int(value)}%"}))

    def download(self, done: int, total: int | None) -> None:
        self.percent(done * 100 / total if total else 0.0)
