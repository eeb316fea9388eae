"""Registry image references: ``oci://registry[:port]/repository[:tag][@sha256:<hex>]``.

``docker://`` is accepted as the same thing (KubeVirt CDI's spelling).  The
registry host is always explicit (no implied docker.io), and the grammar is
the distribution spec's, so nothing but a checked host, repository path and
tag or digest ever reaches a request line.  Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SourceNotAllowed

REGISTRY_SCHEMES = frozenset({"oci", "docker"})

# The distribution spec's grammar (reference/regexp.go), sha256 digests only.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port], as written (IPv6 in brackets)
    repository: str
    tag: str | None  # None when a digest is given
    digest: str | None  # sha256:<hex>

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest when known, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def host(self) -> str:
        """The registry's host name or address, without brackets or port."""
        if self.registry.startswith("["):
            return self.registry[1:].split("]", 1)[0]
        return self.registry.split(":", 1)[0]

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{self.registry}/{self.repository}{tail}"


def parse_reference(url: str) -> Reference:
    """Parse an ``oci://`` or ``docker://`` URL; SourceNotAllowed names what is wrong."""
    scheme, sep, rest = url.partition("://")
    field = "spec.source.image.url"
    if not sep or scheme.lower() not in REGISTRY_SCHEMES:
        raise SourceNotAllowed(f"{field}: {url!r} is not an oci:// or docker:// reference")
    registry, slash, path = rest.partition("/")
    if not slash or not path:
        raise SourceNotAllowed(
            f"{field}: {url!r} needs a registry and a repository, "
            "oci://registry[:port]/repository[:tag|@sha256:<hex>]"
        )
    if not _HOST.match(registry) or "@" in registry:
        raise SourceNotAllowed(f"{field}: {registry!r} is not a registry host[:port]")
    path, at, digest = path.partition("@")
    name, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "")
    if not _REPOSITORY.match(name) or len(name) > 255:
        raise SourceNotAllowed(
            f"{field}: repository {name!r} is not a valid repository name "
            "(lower-case components joined by /)"
        )
    if colon and not _TAG.match(tag):
        raise SourceNotAllowed(f"{field}: tag {tag!r} is not a valid tag")
    if at and not DIGEST.match(digest):
        raise SourceNotAllowed(f"{field}: digest {digest!r} is not sha256:<64 hex digits>")
    if at:
        return Reference(registry.lower(), name, None, digest)
    return Reference(registry.lower(), name, tag or "latest", None)
