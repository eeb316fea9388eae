"""What a disk may read: the image-source policy and its check at every hop.

A VMDiskClass's ``imageSources`` (bounded by the agent's Settings) becomes a
``SourcePolicy``.  Every URL the agent is about to fetch, the first one and
each redirect target, is checked here on the *addresses its name resolves
to*; the caller then connects to exactly the address that was checked, so a
DNS answer that changes between check and connect (rebinding) cannot move
the fetch elsewhere.

Addresses no image server should have are refused unless a CIDR in
``allowed_hosts`` names them explicitly: loopback, link-local (cloud metadata
at 169.254.169.254 and fd00:ec2::254 included), unspecified, multicast and
reserved ranges, and the cluster's own ranges (``Settings.cluster_cidrs``).
With ``allowed_hosts`` unset only public (globally routable) addresses pass.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import DownloadFailed, SourceNotAllowed

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

_METADATA = (ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Kubernetes' default service range (kubeadm); Settings may replace it.
DEFAULT_CLUSTER_CIDRS = ("10.96.0.0/12",)


@dataclass(frozen=True)
class SourcePolicy:
    """What a disk's class lets it read (from VMDiskClass.spec.imageSources, bounded by Settings)."""  # noqa: E501

    allowed_hosts: tuple[str, ...] | None = None  # host names and CIDRs; None = any public address
    file_dirs: tuple[Path, ...] = ()  # file:// roots (already intersected with settings)
    require_checksum: bool = False
    plain_http_registries: tuple[str, ...] = ()  # host[:port] of registries reached without TLS
    registry_credentials: str | None = None  # a dockerconfigjson Secret in the agent's namespace


def default_policy(settings: Settings) -> SourcePolicy:
    """The policy of disks whose class brings none: the agent's own settings."""
    return SourcePolicy(allowed_hosts=settings.image_hosts, file_dirs=settings.image_dirs)


@dataclass(frozen=True)
class HopCheck:
    """Checks one URL's host against a policy; built once per fetch."""

    policy: SourcePolicy
    cluster_cidrs: tuple[str, ...] = DEFAULT_CLUSTER_CIDRS
    resolve: Resolver | None = None  # tests inject DNS answers; default getaddrinfo

    def address(self, host: str, port: int, *, hop: str) -> str:
        """The one address to connect to for ``host``, after checking every answer.

        ``hop`` is the (redacted) URL named in the refusal.  All resolved
        addresses must pass: a name answering with one public and one
        internal address is refused rather than raced.
        """
        literal = _literal(host)
        answers = [literal] if literal is not None else self._resolve(host, port, hop)
        for addr in answers:
            problem = self._problem(host, addr, is_literal=literal is not None)
            if problem is not None:
                raise SourceNotAllowed(f"image source {hop} refused: {problem}")
        return str(answers[0])

    def _resolve(self, host: str, port: int, hop: str) -> list[Address]:
        try:
            if self.resolve is not None:
                found = list(self.resolve(host, port))
            else:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                found = [str(info[4][0]) for info in infos]
        except UnicodeError as exc:
            raise SourceNotAllowed(f"image source {hop}: host name {host!r}: {exc}") from exc
        except OSError as exc:  # DNS down or the name unknown (yet): worth retrying
            raise DownloadFailed(f"image source {hop}: cannot resolve {host!r}: {exc}") from exc
        addresses = []
        for text in dict.fromkeys(found):
            addr = _literal(text)
            if addr is None:
                raise SourceNotAllowed(f"image source {hop}: {host!r} resolved to {text!r}")
            addresses.append(addr)
        if not addresses:
            raise DownloadFailed(f"image source {hop}: {host!r} has no address")
        return addresses

    def _problem(self, host: str, addr: Address, *, is_literal: bool) -> str | None:
        """Why ``addr`` (an answer for ``host``) may not be fetched from, or None."""
        allowed = self.policy.allowed_hosts
        networks, names = _split(allowed or ())
        if any(addr in net for net in networks if net.version == addr.version):
            return None  # an administrator named this range explicitly
        where = f"{host} ({addr})" if not is_literal else str(addr)
        internal = self._internal(addr)
        if internal is not None:
            return f"{where} is {internal}; only a CIDR in imageSources.allowedHosts can allow it"
        if allowed is None:
            if addr.is_global:
                return None
            return f"{where} is not a public address and the class names no allowedHosts"
        if not is_literal and any(_name_matches(host, name) for name in names):
            return None
        listed = ", ".join(allowed) or "empty"
        return f"{where} is not in imageSources.allowedHosts ({listed})"

    def _internal(self, addr: Address) -> str | None:
        """A description when ``addr`` (or an IPv4 address it embeds) is refused by default."""
        for inner in reversed(_embedded(addr)):  # the embedded IPv4 says more
            found = self._internal_one(inner)
            if found is not None:
                return found if inner == addr else f"{found} ({inner}, embedded)"
        return None

    def _internal_one(self, addr: Address) -> str | None:
        if any(addr in net for net in _METADATA if net.version == addr.version):
            return "a cloud metadata address"
        checks = (
            (addr.is_loopback, "a loopback address"),
            (addr.is_link_local, "a link-local address"),
            (addr.is_unspecified, "the unspecified address"),
            (addr.is_multicast, "a multicast address"),
            (addr.is_reserved, "a reserved address"),
        )
        for hit, what in checks:
            if hit:
                return what
        for cidr in self.cluster_cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version == addr.version and addr in net:
                return f"in the cluster range {cidr}"
        return None


def _embedded(addr: Address) -> list[Address]:
    """``addr`` and the IPv4 addresses it carries (mapped, 6to4, NAT64 64:ff9b::/96)."""
    found: list[Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        for inner in (addr.ipv4_mapped, addr.sixtofour):
            if inner is not None:
                found.append(inner)
        if addr in _NAT64:
            found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return found


def _split(entries: Sequence[str]) -> tuple[list[Network], list[str]]:
    networks: list[Network] = []
    names: list[str] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.append(entry.lower().rstrip("."))
    return networks, names


def _name_matches(host: str, entry: str) -> bool:
    host = host.lower().rstrip(".")
    if entry.startswith("*."):
        return host.endswith(entry[1:]) and len(host) > len(entry) - 1
    return host == entry


def _literal(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
