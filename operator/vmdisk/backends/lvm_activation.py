"""Making an LV's block device exist: device-mapper activation on a real node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..host.lvm import Lvm


class Activation(Protocol):
    """Makes an LV's block device exist and says where it is."""

    def open(self, vg: str, lv: str) -> Path: ...

    def close(self, vg: str, lv: str) -> None: ...


@dataclass(frozen=True)
class DeviceMapperActivation:
    """The real thing: ``lvchange -ay`` and ``/dev/<vg>/<lv>``."""

    lvm: Lvm

    def open(self, vg: str, lv: str) -> Path:
        volume = self.lvm.volume(vg, lv)
        if volume is None or not volume.active:
            self.lvm.activate(vg, lv)
        return Path("/dev") / vg / lv

    def close(self, vg: str, lv: str) -> None:
        volume = self.lvm.volume(vg, lv)
        if volume is not None and volume.active:
            self.lvm.deactivate(vg, volume)
