"""The rbd backend's settings and ceph.conf facts.  Pure; importable without librados."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from .base import NetworkHost


@dataclass(frozen=True)
class RbdSettings:
    """The node's Ceph defaults; ``spec.rbd`` overrides pool, user, conf and secret."""

    pool: str | None = None
    user: str | None = None
    ceph_conf: Path | None = None
    keyring: Path | None = None  # None: the keyring ceph.conf names
    secret_uuid: str | None = None  # libvirt secret holding the user's key
    node_name: str = ""
    op_timeout: float = 30.0
    command_timeout: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RbdSettings:
        return cls(
            pool=settings.rbd_pool,
            user=settings.rbd_user,
            ceph_conf=settings.ceph_conf,
            secret_uuid=settings.rbd_secret_uuid,
            node_name=settings.node_name,
            command_timeout=settings.command_timeout,
        )


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
