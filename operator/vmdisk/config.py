"""The one settings object.  No other module reads environment variables."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Parse ``90s``, ``15m``, ``24h``, ``7d``, ``1h30m``; the unit is required.

    A bare number is refused: ``3`` meaning three seconds (not days, not
    hours) is how a cache is emptied by mistake.
    """
    text = text.strip()
    if text.isdigit():
        raise ValueError(
            f"invalid duration {text!r}: give a unit, e.g. {text}s, {text}h or {text}d"
        )
    pos, total = 0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}: use e.g. 30m, 24h, 7d")
    return float(total)


@dataclass(frozen=True)
class Settings:
    """Operator and local-mode settings, built once and passed in."""

    state_dir: Path = Path("/var/lib/vmdisk")
    node_name: str = field(default_factory=socket.gethostname)
    default_backend: str = "qcow2"
    image_dirs: tuple[Path, ...] = ()
    cache_max_age: float = 24 * 3600.0
    # Allow-lists: what a VMDiskClass may name on this node; the first entry is
    # the default for a class that names none.  Comma-separated in the env.
    rbd_pools: tuple[str, ...] = ()
    rbd_users: tuple[str, ...] = ()  # Ceph ids without "client."; none: librados' default
    ceph_confs: tuple[Path, ...] = ()
    rbd_secret_uuid: str | None = None
    lvm_vgs: tuple[str, ...] = ()
    # The agent's own namespace: the only one it reads Secrets (class keys) from.
    namespace: str = "vmdisk-system"
    # Sane ceiling on any image's virtual size (Nova's lesson: a tiny file
    # can claim petabytes).  Not part of the fixed interface.
    max_virtual_size: int = 64 * 1024**4
    command_timeout: float = 3600.0
    # The node's libvirtd: whose domains hold disks, and which grows go online.
    # None: no libvirt (only QEMU's image locks and RBD watchers are checked).
    libvirt_uri: str | None = "qemu:///system"
    # Image-source policy for disks whose class brings none (local mode):
    # host names and CIDRs, None = any public address.  The demo's loopback
    # server needs VMDISK_IMAGE_HOSTS=127.0.0.1/32: loopback is never implied.
    image_hosts: tuple[str, ...] | None = None
    # Ranges no image fetch may reach unless a class names them (services, pods).
    cluster_cidrs: tuple[str, ...] = ("10.96.0.0/12",)
    # Bounds on one fetch (see docs/operations.md for why these figures).
    fetch_timeout: float = 60.0
    fetch_deadline: float = 4 * 3600.0
    fetch_min_rate: int = 64 * 1024
    fetch_rate_window: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``VMDISK_*`` variables, then explicit overrides (flags)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if "VMDISK_STATE_DIR" in env:
            values["state_dir"] = Path(env["VMDISK_STATE_DIR"])
        if "VMDISK_NODE_NAME" in env:
            values["node_name"] = env["VMDISK_NODE_NAME"]
        if "VMDISK_DEFAULT_BACKEND" in env:
            values["default_backend"] = env["VMDISK_DEFAULT_BACKEND"]
        if env.get("VMDISK_IMAGE_DIRS"):
            values["image_dirs"] = tuple(
                Path(p) for p in env["VMDISK_IMAGE_DIRS"].split(os.pathsep) if p
            )
        if "VMDISK_CACHE_MAX_AGE" in env:
            values["cache_max_age"] = _duration("VMDISK_CACHE_MAX_AGE", env["VMDISK_CACHE_MAX_AGE"])
        for key, name in (
            ("VMDISK_RBD_POOL", "rbd_pools"),
            ("VMDISK_RBD_USER", "rbd_users"),
            ("VMDISK_LVM_VG", "lvm_vgs"),
        ):
            if env.get(key):
                values[name] = _list(env[key])
        if env.get("VMDISK_CEPH_CONF"):
            values["ceph_confs"] = tuple(Path(p) for p in _list(env["VMDISK_CEPH_CONF"]))
        for key, name in (
            ("VMDISK_RBD_SECRET_UUID", "rbd_secret_uuid"),
            ("VMDISK_NAMESPACE", "namespace"),
        ):
            if env.get(key):
                values[name] = env[key]
        if "VMDISK_LIBVIRT_URI" in env:
            values["libvirt_uri"] = env["VMDISK_LIBVIRT_URI"] or None
        if env.get("VMDISK_IMAGE_HOSTS", "").strip():  # blank: unset, public addresses only
            values["image_hosts"] = _hosts("VMDISK_IMAGE_HOSTS", env["VMDISK_IMAGE_HOSTS"])
        if "VMDISK_CLUSTER_CIDRS" in env:
            values["cluster_cidrs"] = _cidrs(env["VMDISK_CLUSTER_CIDRS"])
        for key, name in (
            ("VMDISK_FETCH_TIMEOUT", "fetch_timeout"),
            ("VMDISK_FETCH_DEADLINE", "fetch_deadline"),
            ("VMDISK_FETCH_RATE_WINDOW", "fetch_rate_window"),
        ):
            if env.get(key):
                values[name] = _positive(key, _duration(key, env[key]))
        if env.get("VMDISK_FETCH_MIN_RATE"):
            values["fetch_min_rate"] = _rate(env["VMDISK_FETCH_MIN_RATE"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        return replace(
            settings,
            # Resolved once: a configured symlink is fine, a planted one below is refused.
            state_dir=settings.state_dir.resolve(),
            image_dirs=tuple(p.resolve() for p in settings.image_dirs),
            ceph_confs=tuple(p.absolute() for p in settings.ceph_confs),
        )


def _duration(key: str, text: str) -> float:
    """``parse_duration``, its error naming the variable."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _list(text: str) -> tuple[str, ...]:
    """``a,b`` (or ``a b``) as ``("a", "b")``."""
    return tuple(p for p in text.replace(",", " ").split() if p)


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.replace(",", " ").split() if item.strip()]


def _hosts(key: str, text: str) -> tuple[str, ...]:
    entries = _split_list(text)
    for entry in entries:
        if "/" in entry or entry.replace(".", "").isdigit() or ":" in entry:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"{key}: {entry!r} is not an address or CIDR: {exc}") from None
    return tuple(e.lower() for e in entries)


def _cidrs(text: str) -> tuple[str, ...]:
    return tuple(
        str(ipaddress.ip_network(c, strict=False)) for c in _hosts("VMDISK_CLUSTER_CIDRS", text)
    )


def _positive(key: str, value: float) -> float:
    if value <= 0:
        raise ValueError(f"{key}: must be positive")
    return value


def _rate(text: str) -> int:
    """Bytes per second: a plain number, or with a binary suffix (64Ki, 1Mi)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", text.strip())
    if match is None:
        raise ValueError(f"VMDISK_FETCH_MIN_RATE: {text!r} is not a rate (e.g. 65536 or 64Ki)")
    factor = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}[match.group(2)]
    return int(match.group(1)) * factor
