"""LVM commands, all through the one runner.

Every call runs with ``LC_ALL=C`` (the runner's environment), sizes in
bytes (``--units b --nosuffix``) and reports as JSON (``--reportformat
json``), so nothing is parsed from human text except the two error phrases
LVM has for a full volume group, which become InsufficientCapacity.

``Lvm(metadata_only=True)`` adds ``--driverloaded n`` to every command: LVM
then edits metadata without talking to device-mapper.  It exists for hosts
whose kernel has no device-mapper (the test machine) and is never the
operator's default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import InsufficientCapacity
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
_LV_FIELDS = "lv_name,vg_name,lv_size,lv_attr,lv_tags,pool_lv,origin,segtype,data_percent"


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

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    def tag_value(self, prefix: str) -> str | None:
        """The value of the one ``<prefix>=<value>`` tag, if present."""
        for tag in self.tags:
            if tag.startswith(prefix + "="):
                return tag[len(prefix) + 1 :]
        return None


@dataclass(frozen=True)
class Segment:
    """Where one linear segment of an LV lies on its physical volume."""

    pv: str
    pe_start: int  # byte offset of extent 0 on the PV
    first_extent: int  # on the PV
    extents: int
    extent_size: int

    @property
    def offset(self) -> int:
        return self.pe_start + self.first_extent * self.extent_size

    @property
    def size(self) -> int:
        return self.extents * self.extent_size


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
    )


@dataclass(frozen=True)
class Lvm:
    """LVM on this host.  No I/O until a method is called."""

    runner: Runner = run
    metadata_only: bool = False
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. LVM_SYSTEM_DIR
    timeout: float = 300.0

    def _run(self, *argv: str, timeout: float | None = None) -> Result:
        full = [argv[0]]
        if self.metadata_only:
            full.append("--driverloaded=n")
        full += argv[1:]
        try:
            return self.runner(full, timeout=timeout or self.timeout, env=self._env())
        except CommandError as exc:
            if any(p in exc.stderr.lower() for p in _FULL):
                raise InsufficientCapacity(
                    f"volume group is full: {exc.stderr.strip().splitlines()[-1]}"
                ) from exc
            raise

    def _env(self) -> dict[str, str]:
        return {"LVM_SUPPRESS_FD_WARNINGS": "1", **self.env}

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

    def segments(self, vg: str, name: str) -> list[Segment]:
        """The LV's linear segments in logical order (for mapping its extents)."""
        extent = self.volume_group(vg).extent_size
        rows = self._query(
            "lvs", "seg", "seg_start_pe,seg_pe_ranges,segtype", "--segments",
            target=_lv_path(vg, name),
        )  # fmt: skip
        starts = {
            p["pv_name"]: int(p["pe_start"])
            for p in self._query("pvs", "pv", "pv_name,pe_start", "-S", f"vg_name={vg}")
        }
        segments = []
        for row in sorted(rows, key=lambda r: int(r["seg_start_pe"])):
            if row["segtype"] != "linear":
                raise ValueError(f"{vg}/{name} is {row['segtype']}, not linear")
            pv, extents = row["seg_pe_ranges"].rsplit(":", 1)
            first, last = (int(x) for x in extents.split("-"))
            segments.append(Segment(pv, starts[pv], first, last - first + 1, extent))
        return segments

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
        self, vg: str, origin: str, name: str, *, cow_size: int | None, tags: Sequence[str] = ()
    ) -> None:
        """A snapshot of ``origin``: thin (no ``cow_size``) or thick with a COW area."""
        argv = ["lvcreate", "--yes", "-s", "-n", check_name("LV", name), *_tags(tags)]
        if cow_size is not None:
            argv += ["-L", f"{cow_size}b"]
        else:
            argv += ["--setactivationskip", "n"]
        self._run(*argv, "--", _lv_path(vg, origin))

    def extend(self, vg: str, name: str, size: int) -> None:
        self._run("lvextend", "-L", f"{size}b", "--", _lv_path(vg, name))

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

    def deactivate(self, vg: str, name: str) -> None:
        self._run("lvchange", "-an", "--", _lv_path(vg, name))

    def remove(self, vg: str, name: str) -> None:
        """Remove an LV; a missing one is fine."""
        if self.volume(vg, name) is not None:
            self._run("lvremove", "--yes", "--", _lv_path(vg, name))


def _tags(tags: Sequence[str]) -> list[str]:
    argv: list[str] = []
    for tag in tags:
        argv += ["--addtag", tag]
    return argv
