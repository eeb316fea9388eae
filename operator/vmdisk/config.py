"""The one settings object.  No other module reads environment variables."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Parse ``90s``, ``15m``, ``24h``, ``7d``, ``1h30m`` (or plain seconds)."""
    text = text.strip()
    if text.isdigit():
        return float(text)
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
            values["cache_max_age"] = parse_duration(env["VMDISK_CACHE_MAX_AGE"])
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
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        return replace(
            settings,
            state_dir=settings.state_dir.absolute(),
            image_dirs=tuple(p.resolve() for p in settings.image_dirs),
            ceph_confs=tuple(p.absolute() for p in settings.ceph_confs),
        )


def _list(text: str) -> tuple[str, ...]:
    """``a,b`` (or ``a b``) as ``("a", "b")``."""
    return tuple(p for p in text.replace(",", " ").split() if p)
