"""LVM commands, all through the one runner.

Every call runs with ``LC_ALL=C`` (the runner's environment), sizes in
bytes (``--units b --nosuffix``) and reports as JSON (``--reportformat
json``), so nothing is parsed from human text except LVM's phrases for a
full volume group (InsufficientCapacity) and for a kernel without the
device-mapper driver or target a volume needs (BackendUnavailable).

Every call also runs with ``DM_DISABLE_UDEV=1``: libdevmapper then makes the
``/dev`` nodes itself and never waits for udev.  Waiting needs the udev
daemon's SysV semaphores, which a pod without the host's IPC namespace
cannot share: with the host's ``/run/udev`` visible, every activation would
hang until its timeout ("udev_sync = 0" / "udev_rules = 0", which lvm2
reports as "DM_DISABLE_UDEV environment variable set.  Overriding
configuration to use udev_rules=0, udev_sync=0, verify_udev_operations=1").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import BackendUnavailable, InsufficientCapacity
from .names import check_lvm_name as check_name
from .run import CommandError, Result, run


def _lv_path(vg: str, name: str) -> str:
    return f"{check_name('volume group', vg)}/{check_name('logical volume', name)}"


class Runner(Protocol):
    """The shape of ``host.run.run`` that LVM and cryptsetup calls use."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = ...,
        input_data: str | None = ...,
        env: Mapping[str, str] | None = ...,
    ) -> Result: ...


_FULL = ("insufficient free space", "insufficient suitable allocatable extents")
# "Failure to communicate with kernel device-mapper driver." (no dm_mod),
# "thin-pool: Required device-mapper target(s) not detected in your kernel."
# (lvcreate), "Can't process LV vg/lv: thin target support missing from kernel?"
# (activation).
_NO_DM = (
    "failure to communicate with kernel device-mapper",
    "required device-mapper target(s) not detected",
    "target support missing from kernel",
)
_LV_FIELDS = "lv_name,vg_name,lv_size,lv_attr,lv_tags,pool_lv,origin,segtype,data_percent,zero"
# The environment of every lvm2 and cryptsetup call (see the module docstring).
NO_UDEV = {"DM_DISABLE_UDEV": "1", "LVM_SUPPRESS_FD_WARNINGS": "1"}


def device_mapper_error(stderr: str) -> BackendUnavailable | None:
    """BackendUnavailable when ``stderr`` says the kernel lacks device-mapper or a target."""
    phrases = (*_NO_DM, "cannot initialize device-mapper")
    said = [line.strip() for line in stderr.splitlines() if any(p in line.lower() for p in phrases)]
    if not said:
        return None
    return BackendUnavailable(
        f"this node's kernel cannot run the volume ({said[0]}); "
        "load the device-mapper modules (dm_mod, dm_snapshot, dm_thin_pool, dm_crypt)"
    )


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size: int
    free: int
    extent_size: int


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg: str
    size: int
    attr: str
    tags: frozenset[str]
    pool: str | None = None
    origin: str | None = None
    segtype: str = "linear"
    data_percent: float | None = None
    zero: bool = False  # a thin pool that zeroes newly provisioned blocks

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def thick_origin(self) -> bool:
        """An origin of thick (COW) snapshots: lvm2 resizes it only while inactive."""
        return self.attr[:1] == "o" and self.segtype != "thin"

    def tag_value(self, prefix: str) -> str | None:
        """The value of the one ``<prefix>=<value>`` tag, if present."""
        for tag in self.tags:
            if tag.startswith(prefix + "="):
                return tag[len(prefix) + 1 :]
        return None


def _report(stdout: str, kind: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for part in json.loads(stdout)["report"]:
        rows.extend(part.get(kind, []))
    return rows


def _lv(row: Mapping[str, str]) -> LogicalVolume:
    percent = row.get("data_percent") or ""
    return LogicalVolume(
        name=row["lv_name"],
        vg=row["vg_name"],
        size=int(row["lv_size"]),
        attr=row["lv_attr"],
        tags=frozenset(t for t in row.get("lv_tags", "").split(",") if t),
        pool=row.get("pool_lv") or None,
        origin=row.get("origin") or None,
        segtype=row.get("segtype") or "linear",
        data_percent=float(percent) if percent else None,
        zero=row.get("zero", "") not in ("", "0"),
    )


@dataclass(frozen=True)
class Lvm:
    """LVM on this host.  No I/O until a method is called."""

    runner: Runner = run
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. LVM_SYSTEM_DIR
    timeout: float = 300.0

    def _run(self, *argv: str, timeout: float | None = None) -> Result:
        try:
            return self.runner(argv, timeout=timeout or self.timeout, env={**NO_UDEV, **self.env})
        except CommandError as exc:
            if any(p in exc.stderr.lower() for p in _FULL):
                raise InsufficientCapacity(
                    f"volume group is full: {exc.stderr.strip().splitlines()[-1]}"
                ) from exc
            unavailable = device_mapper_error(exc.stderr)
            if unavailable is not None:
                raise unavailable from exc
            raise

    def _query(
        self, command: str, kind: str, fields: str, *args: str, target: str | None = None
    ) -> list[dict[str, str]]:
        argv = [command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields]
        argv += args
        if target is not None:
            argv += ["--", target]  # never an option, whatever it looks like
        return _report(self._run(*argv).stdout, kind)

    # -- queries -------------------------------------------------------------
    def volume_group(self, vg: str) -> VolumeGroup:
        (row,) = self._query(
            "vgs", "vg", "vg_name,vg_size,vg_free,vg_extent_size", target=check_name("VG", vg)
        )
        return VolumeGroup(
            row["vg_name"], int(row["vg_size"]), int(row["vg_free"]), int(row["vg_extent_size"])
        )

    def volumes(self, vg: str, *, tag: str | None = None) -> list[LogicalVolume]:
        """All LVs of ``vg`` (with ``tag`` only, when given), hidden ones excluded."""
        args = ["-S", f"lv_tags={tag}"] if tag else []
        vg = check_name("volume group", vg)
        return [_lv(r) for r in self._query("lvs", "lv", _LV_FIELDS, *args, target=vg)]

    def volume(self, vg: str, name: str) -> LogicalVolume | None:
        vg, name = check_name("volume group", vg), check_name("logical volume", name)
        for lv in self._query("lvs", "lv", _LV_FIELDS, "-S", f"lv_name={name}", target=vg):
            return _lv(lv)
        return None

    # -- changes -------------------------------------------------------------
    def create(
        self,
        vg: str,
        name: str,
        size: int,
        *,
        tags: Sequence[str] = (),
        thin_pool: str | None = None,
    ) -> None:
        """A linear LV of ``size`` bytes, or a thin one in ``thin_pool``."""
        vg = check_name("volume group", vg)
        argv = ["lvcreate", "--yes", "--wipesignatures", "y", "-n", check_name("LV", name)]
        argv += _tags(tags)
        if thin_pool is not None:
            pool = check_name("thin pool", thin_pool)
            argv += ["--type", "thin", "-V", f"{size}b", "--thinpool", pool, "--", vg]
        else:
            argv += ["--type", "linear", "-L", f"{size}b", "--", vg]
        self._run(*argv)

    def snapshot(
        self, vg: str, origin: LogicalVolume, name: str, *, tags: Sequence[str] = ()
    ) -> None:
        """A snapshot of ``origin``: thin in a thin origin's pool, else thick and never full.

        A thick snapshot whose COW area fills is invalidated for good.  Its
        COW area is asked for with room to spare (``cow_request``), which lvm2
        trims to the most the snapshot can ever use ("Reducing COW size ...
        down to maximum usable size"): exactly what a full overwrite of the
        origin needs, chunk exceptions included.  The origin's exact size
        would not do: the exception metadata comes on top of it.
        """
        argv = ["lvcreate", "--yes", "-s", "-n", check_name("LV", name), *_tags(tags)]
        if origin.segtype == "thin":
            argv += ["--setactivationskip", "n"]
        else:
            argv += ["-L", f"{cow_request(origin.size)}b"]
        self._run(*argv, "--", _lv_path(vg, origin.name))

    def extend(self, vg: str, volume: LogicalVolume, size: int) -> None:
        """Grow an LV to ``size`` bytes; a thick origin is grown while inactive.

        lvm2 refuses an active one: "Snapshot origin volumes can be resized
        only while inactive: try lvchange -an."  Deactivating an origin takes
        its snapshots down with it and activating it brings them back; the
        snapshots keep their size and content (they do not track the origin
        beyond the size it had when they were taken).
        """
        target = _lv_path(vg, volume.name)
        if not volume.thick_origin:
            self._run("lvextend", "-L", f"{size}b", "--", target)
            return
        self._run("lvchange", "-an", "--", target)
        try:
            self._run("lvextend", "-L", f"{size}b", "--", target)
        finally:
            if volume.active:
                self.activate(vg, volume.name)

    def merge(self, vg: str, snapshot: str) -> None:
        """Merge a snapshot into its origin and wait for it (the origin must not be open)."""
        self._run(
            "lvconvert", "--merge", "--interval", "1", "--", _lv_path(vg, snapshot), timeout=3600.0
        )

    def tag(
        self, vg: str, name: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> None:
        argv = ["lvchange"]
        for tag in remove:
            argv += ["--deltag", tag]
        argv += _tags(add)
        self._run(*argv, "--", _lv_path(vg, name))

    def activate(self, vg: str, name: str) -> None:
        # -K: thin snapshots skip activation by default.
        self._run("lvchange", "-ay", "-K", "--", _lv_path(vg, name))

    def deactivate(self, vg: str, volume: LogicalVolume) -> None:
        """Deactivate an LV (an origin takes its thick snapshots with it).

        Never for a thick snapshot: lvm2 cannot deactivate one alone and asks
        "Change of snapshot vg/snap will also change its origin vg/lv. Proceed?
        [y/n]" instead -- with ``--yes`` that would take the VM's disk away.
        ``remove`` removes an active snapshot without touching its origin.
        """
        if volume.origin and volume.segtype != "thin":
            raise ValueError(f"{vg}/{volume.name} is a thick snapshot; remove it instead")
        self._run("lvchange", "-an", "--", _lv_path(vg, volume.name))

    def remove(self, vg: str, name: str) -> None:
        """Remove an LV, active or not (its device must not be open); a missing one is fine."""
        if self.volume(vg, name) is not None:
            self._run("lvremove", "--yes", "--", _lv_path(vg, name))


def cow_request(origin_size: int) -> int:
    """What to ask for a thick snapshot's COW area: more than it can use (lvm2 trims it).

    dm-snapshot stores 16 bytes of metadata per chunk, a chunk of them per
    256 exceptions at the 4 KiB minimum chunk size, plus a header chunk: at
    most 1/256 of the origin and some extents.  1/32 plus 16 MiB is above
    that for any origin.
    """
    return origin_size + origin_size // 32 + 16 * 1024 * 1024


def _tags(tags: Sequence[str]) -> list[str]:
    argv: list[str] = []
    for tag in tags:
        argv += ["--addtag", tag]
    return argv
