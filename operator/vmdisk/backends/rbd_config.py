"""The rbd backend's class parameters, settings and ceph.conf facts.

Pure, and importable without librados: the registry and the CRD generator
use it on every node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Self

from pydantic import Field

from ..config import Settings
from ..errors import ClassNotAllowed
from ..host.names import CEPH_POOL_PATTERN, CEPH_USER_PATTERN
from ..layout import StateLayout
from .base import BackendPlugin, ClassParameters, DiskBackend, NetworkHost

_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class RbdParameters(ClassParameters):
    """``spec.parameters`` of an rbd class; each must be one the node's settings allow."""

    pool: str | None = Field(
        default=None, pattern=CEPH_POOL_PATTERN, description="rbd: pool (VMDISK_RBD_POOL)."
    )
    user: str | None = Field(
        default=None,
        pattern=CEPH_USER_PATTERN,
        description='rbd: Ceph id without "client." (VMDISK_RBD_USER).',
    )
    ceph_conf: str | None = Field(
        default=None, pattern="^/.*", max_length=4096, description="rbd: (VMDISK_CEPH_CONF)."
    )
    secret_uuid: str | None = Field(
        default=None,
        alias="secretUUID",
        pattern=_UUID,
        description="rbd: libvirt secret holding the user's key, for the disk XML.",
    )

    def resolve(self, settings: Settings) -> Self:
        pool = _allowed("pool", self.pool, settings.rbd_pools, "VMDISK_RBD_POOL")
        user = _allowed("user", self.user, settings.rbd_users, "VMDISK_RBD_USER")
        confs = tuple(str(c) for c in settings.ceph_confs)
        conf = _allowed("cephConf", self.ceph_conf, confs, "VMDISK_CEPH_CONF")
        if pool is None:
            raise ClassNotAllowed(
                "spec.parameters.pool: the class names no pool and the node has no default "
                "(VMDISK_RBD_POOL)"
            )
        return self.model_copy(
            update={
                "pool": pool,
                "user": user,
                "ceph_conf": conf,
                "secret_uuid": self.secret_uuid or settings.rbd_secret_uuid,
            }
        )

    @property
    def placement(self) -> str | None:
        return self.pool


def _allowed(field: str, value: str | None, allowed: tuple[str, ...], env: str) -> str | None:
    """``value`` (default: the first allowed) when the node allows it."""
    if value is None:
        return allowed[0] if allowed else None
    if value not in allowed:
        raise ClassNotAllowed(
            f"spec.parameters.{field}: {value!r} is not allowed on this node "
            f"({env}: {', '.join(allowed) or 'unset'})"
        )
    return value


@dataclass(frozen=True)
class RbdSettings:
    """The node's Ceph allow-lists (first entries: defaults) and connection settings."""

    pools: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    ceph_confs: tuple[Path, ...] = ()
    keyring: Path | None = None  # None: the keyring ceph.conf names
    secret_uuid: str | None = None  # libvirt secret holding the default user's key
    node_name: str = ""
    op_timeout: float = 30.0
    command_timeout: float = 3600.0

    @property
    def pool(self) -> str | None:
        return self.pools[0] if self.pools else None

    @property
    def user(self) -> str | None:
        return self.users[0] if self.users else None

    @property
    def ceph_conf(self) -> Path | None:
        return self.ceph_confs[0] if self.ceph_confs else None

    @classmethod
    def from_settings(cls, settings: Settings) -> RbdSettings:
        return cls(
            pools=settings.rbd_pools,
            users=settings.rbd_users,
            ceph_confs=settings.ceph_confs,
            secret_uuid=settings.rbd_secret_uuid,
            node_name=settings.node_name,
            command_timeout=settings.command_timeout,
        )


def _build(settings: Settings, layout: StateLayout) -> DiskBackend | None:
    """The rbd backend on nodes configured for Ceph (a pool or a ceph.conf)."""
    if not (settings.rbd_pools or settings.ceph_confs):
        return None
    from .rbd import RbdBackend  # imports librados: only on Ceph nodes

    return RbdBackend(RbdSettings.from_settings(settings), layout)


PLUGIN = BackendPlugin("rbd", RbdParameters, _build, shared=True)


def parse_mon_host(text: str) -> tuple[NetworkHost, ...]:
    """Monitor addresses from ceph.conf's ``mon_host``, one per monitor.

    Handles ``a,b``, ``a b``, ``[v2:ip:3300,v1:ip:6789]`` address vectors
    (the msgr v1 address is taken: QEMU's ``host`` entries are v1 unless the
    port is 3300), ``/nonce`` suffixes and ``[v6::addr]:port``.
    """
    hosts: list[NetworkHost] = []
    for token in _split_top(text, ", ;\t\n"):
        addrs = [token]
        if token.startswith("[") and token.endswith("]") and ("v1:" in token or "v2:" in token):
            addrs = _split_top(token[1:-1], ",")
        preferred = next((a for a in addrs if a.startswith("v1:")), addrs[0])
        hosts.append(_parse_addr(preferred))
    return tuple(hosts)


def _split_top(text: str, separators: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch in separators and depth == 0:
            if current:
                out.append(current)
            current = ""
        else:
            current += ch
    if current:
        out.append(current)
    return out


def _parse_addr(addr: str) -> NetworkHost:
    for prefix in ("v1:", "v2:", "any:"):
        addr = addr.removeprefix(prefix)
    addr = addr.split("/", 1)[0]
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.removeprefix(":")
        return NetworkHost(host, int(port) if port else None)
    if addr.count(":") == 1:
        host, port = addr.split(":")
        return NetworkHost(host, int(port))
    return NetworkHost(addr)  # a hostname, an IPv4 address, or a bare IPv6 address
