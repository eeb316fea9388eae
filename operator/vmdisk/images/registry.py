"""Pulling a containerDisk's layer from an OCI registry (the distribution API v2).

The manifest is resolved first (OCI or Docker v2; an index or manifest list
is narrowed to this node's platform), every manifest asked for by digest is
checked against it, and the one layer is then streamed (``blobstream``) with
the download module's own GET, so the image-source policy is checked at every
hop (registries redirect blob GETs to object stores), bytes and time are
bounded, a dropped connection resumes, and the layer digest is verified in
the same pass that unpacks it.

Registry auth: anonymous, HTTP Basic, or the bearer-token flow a registry's
``WWW-Authenticate`` challenge starts, with credentials from the class's
dockerconfigjson Secret.  A token or password goes to its own origin only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import platform
import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import (
    ChecksumMismatch,
    ContainerDiskInvalid,
    DownloadFailed,
    ImageTooLarge,
    RegistryAuthFailed,
    SourceNotAllowed,
)
from .blobstream import BlobStream
from .download import Reply, get_small
from .fetchbounds import HttpOptions, Progress, over_fetch_limit
from .reference import DIGEST, Reference
from .source import HTTP_SCHEMES, redact

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)
DOCKER_CONFIG_KEY = ".dockerconfigjson"  # the key of a kubernetes.io/dockerconfigjson Secret
_MAX_MANIFEST = 4 * 1024 * 1024  # the distribution registry's own limit
_MAX_TOKEN = 1024 * 1024
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{1,16384}$")  # RFC 6750 b64token
_PARAM = re.compile(r'([A-Za-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')
_MACHINES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    """This node's platform in the OCI spelling (GOOS/GOARCH), read from the host."""
    machine = platform.machine().lower()
    if machine.startswith("armv"):
        return Platform(platform.system().lower(), "arm", f"v{machine[4]}")
    return Platform(platform.system().lower(), _MACHINES.get(machine, machine))


@dataclass(frozen=True)
class RegistryAuth:
    """A class's registry credentials: the Secret's name and its ``.dockerconfigjson``."""

    secret: str
    config: bytes


@dataclass(frozen=True)
class Layer:
    digest: str  # sha256:<hex>
    size: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Resolved:
    digest: str  # what the reference resolved to (an index's own digest for multi-arch)
    layer: Layer


class _Platform(BaseModel):
    model_config = ConfigDict(extra="ignore")
    os: str = ""
    architecture: str = ""
    variant: str | None = None


class _Descriptor(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    media_type: str = Field(default="", alias="mediaType")
    digest: str = Field(pattern=r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
    size: int = Field(ge=0)
    platform: _Platform | None = None
    urls: list[str] | None = None


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    schema_version: int = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    manifests: list[_Descriptor] | None = Field(default=None, max_length=1024)
    layers: list[_Descriptor] | None = Field(default=None, max_length=1024)


class RegistryClient:
    """One repository of one registry, for one pull; no I/O until called."""

    def __init__(
        self,
        ref: Reference,
        options: HttpOptions,
        *,
        plain_http: bool = False,
        auth: RegistryAuth | None = None,
    ) -> None:
        self.ref = ref
        self.options = options
        self.base = f"{'http' if plain_http else 'https'}://{ref.registry}/v2/{ref.repository}"
        self.auth = auth
        self.header: tuple[tuple[str, str], ...] = ()  # Authorization, once earned

    def resolve(self, want: Platform) -> Resolved:
        """The reference's digest and the one layer of its image for ``want``."""
        body, kind = self._manifest(self.ref.reference)
        top = "sha256:" + hashlib.sha256(body).hexdigest()
        manifest = _parse(body, self.ref)
        if manifest.manifests is not None:
            chosen = _choose(manifest.manifests, want, self.ref)
            body, kind = self._manifest(chosen.digest)
            manifest = _parse(body, self.ref)
            if manifest.manifests is not None:
                raise ContainerDiskInvalid(f"image {self.ref}: an index inside an index")
        if kind in (OCI_INDEX, DOCKER_LIST) or manifest.layers is None:
            raise ContainerDiskInvalid(f"image {self.ref}: the manifest lists no layers")
        return Resolved(top, _layer(manifest.layers, self.ref, self.options.max_bytes))

    def open_layer(self, layer: Layer, progress: Progress | None) -> BlobStream:
        """The layer blob as a stream; its digest is checked by ``BlobStream.finish``."""
        options = replace(
            self.options,
            max_bytes=min(self.options.max_bytes, layer.size),
            origin_headers=self.header,
        )
        url = f"{self.base}/blobs/{layer.digest}"
        return BlobStream(
            url, digest=layer.digest, size=layer.size, options=options, progress=progress
        )

    def check_layer(self, layer: Layer) -> None:
        """Ask for the layer's first byte before a cached copy of it is used.

        The cache is shared by content, so without this a manifest that only
        names a layer (a registry the class allows, but one that does not hold
        it, or a login that may not read it) would get another class's pull.
        """
        url = f"{self.base}/blobs/{layer.digest}"
        try:
            reply = self._get(url, "*/*", 1, {"Range": "bytes=0-0"})
        except ImageTooLarge:
            return  # it ignored the range and sent the blob: it does hold it
        if reply.status not in (200, 206):
            raise DownloadFailed(
                f"registry {self.ref.registry} does not serve layer {layer.digest} of "
                f"{self.ref} (HTTP {reply.status}); a cached copy is used only for a "
                "repository that serves it"
            )

    def _manifest(self, reference: str) -> tuple[bytes, str]:
        reply = self._get(f"{self.base}/manifests/{reference}", _ACCEPT, _MAX_MANIFEST)
        sep = "@" if DIGEST.match(reference) else ":"
        shown = f"{self.ref.repository}{sep}{reference}"
        if reply.status == 404:
            raise DownloadFailed(f"registry {self.ref.registry} has no image {shown} (HTTP 404)")
        if reply.status != 200:
            raise DownloadFailed(
                f"registry {self.ref.registry}: manifest of {shown} returned HTTP {reply.status}"
            )
        if DIGEST.match(reference):
            found = "sha256:" + hashlib.sha256(reply.body).hexdigest()
            if found != reference:
                raise ChecksumMismatch(
                    f"image {self.ref}: the registry sent manifest {found} for {reference}"
                )
        return reply.body, reply.headers.get("content-type", "").split(";")[0].strip()

    def _get(self, url: str, accept: str, limit: int, extra: dict[str, str] | None = None) -> Reply:
        """GET on the registry, answering one auth challenge with the class's credentials."""
        headers = {"Accept": accept, **(extra or {})}
        reply = self._send(url, headers, limit)
        if reply.status != 401:
            return self._allowed(reply)
        if self.header:
            raise self._refused("refused the token it issued")
        self._authenticate(reply.headers.get("www-authenticate", ""))
        return self._allowed(self._send(url, headers, limit))

    def _send(self, url: str, headers: dict[str, str], limit: int) -> Reply:
        options = replace(self.options, origin_headers=self.header)
        return get_small(url, headers, options, limit=limit)

    def _allowed(self, reply: Reply) -> Reply:
        if reply.status in (401, 403):
            raise self._refused(f"answered HTTP {reply.status}")
        return reply

    def _authenticate(self, challenge: str) -> None:
        scheme, _, rest = challenge.strip().partition(" ")
        params = {m[1].lower(): m[2] if m[2] is not None else m[3] for m in _PARAM.finditer(rest)}
        basic = self._basic()
        if scheme.lower() == "basic":
            if basic is None:
                raise self._refused("needs credentials")
            self.header = (("Authorization", basic),)
            return
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise self._refused(f"sent an auth challenge this agent cannot answer: {scheme!r}")
        realm = params["realm"]
        if urlsplit(realm).scheme.lower() not in HTTP_SCHEMES:
            raise SourceNotAllowed(
                f"registry {self.ref.registry}: token realm {redact(realm)!r} is not http(s)"
            )
        query = {"scope": f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        sep = "&" if urlsplit(realm).query else "?"
        headers = (("Authorization", basic),) if basic is not None else ()
        reply = get_small(
            realm + sep + urlencode(query),
            {"Accept": "application/json"},
            replace(self.options, origin_headers=headers),
            limit=_MAX_TOKEN,
        )
        if reply.status != 200:
            raise self._refused(f"token endpoint {redact(realm)} answered HTTP {reply.status}")
        try:
            answer = json.loads(reply.body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise self._refused(f"token endpoint {redact(realm)} sent no usable token")
        self.header = (("Authorization", f"Bearer {token}"),)

    def _basic(self) -> str | None:
        found = credentials_for(self.auth, self.ref.registry) if self.auth else None
        if found is None:
            return None
        return "Basic " + base64.b64encode(f"{found[0]}:{found[1]}".encode()).decode()

    def _refused(self, what: str) -> RegistryAuthFailed:
        if self.auth is None:
            given = "anonymously (the class names no imageSources.registryCredentialsRef)"
        elif credentials_for(self.auth, self.ref.registry) is None:
            given = f"anonymously (Secret {self.auth.secret} has no entry for this registry)"
        else:
            given = f"with the credentials of Secret {self.auth.secret}"
        return RegistryAuthFailed(
            f"registry {self.ref.registry}, pulling {self.ref.repository} {given}: {what}"
        )


def credentials_for(auth: RegistryAuth, registry: str) -> tuple[str, str] | None:
    """The user and password a dockerconfigjson holds for ``registry`` (host[:port])."""
    where = f"Secret {auth.secret}: .dockerconfigjson"
    try:
        data: Any = json.loads(auth.config)
    except ValueError:
        raise RegistryAuthFailed(f"{where} is not JSON") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        raise RegistryAuthFailed(f'{where} has no "auths" object')
    for key, entry in auths.items():
        if _registry_key(str(key)) != registry or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                pair = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise RegistryAuthFailed(f"{where}: auths[{key!r}].auth is not base64") from None
            user, _, password = pair.partition(":")
            return user, password
        name, secret = entry.get("username"), entry.get("password")
        if isinstance(name, str) and isinstance(secret, str):
            return name, secret
        raise RegistryAuthFailed(f"{where}: auths[{key!r}] has no auth nor username/password")
    return None


def _registry_key(key: str) -> str:
    """``https://host:port/v1/`` and ``host:port`` name the same registry."""
    key = key.strip().lower()
    for prefix in ("https://", "http://"):
        key = key.removeprefix(prefix)
    return key.split("/", 1)[0]


def _parse(body: bytes, ref: Reference) -> _Manifest:
    try:
        manifest = _Manifest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the document"
        raise ContainerDiskInvalid(
            f"image {ref}: the registry's manifest is not a v2 manifest ({where}: {first['msg']})"
        ) from None
    if manifest.schema_version != 2:
        raise ContainerDiskInvalid(
            f"image {ref}: manifest schema version {manifest.schema_version}; only 2 is supported"
        )
    return manifest


def _choose(entries: list[_Descriptor], want: Platform, ref: Reference) -> _Descriptor:
    """The index entry for this node's platform (an exact variant first)."""
    fits = [
        e
        for e in entries
        if e.platform is not None
        and (e.platform.os, e.platform.architecture) == (want.os, want.architecture)
        and e.media_type in (OCI_MANIFEST, DOCKER_MANIFEST, "")
    ]
    fits.sort(key=lambda e: e.platform is None or e.platform.variant != want.variant)
    if not fits:
        offered = sorted(
            {
                str(Platform(e.platform.os, e.platform.architecture, e.platform.variant))
                for e in entries
                if e.platform is not None
            }
        )
        raise ContainerDiskInvalid(
            f"image {ref} has no manifest for this node's platform {want} "
            f"(it offers {', '.join(offered) or 'none'})"
        )
    if not DIGEST.match(fits[0].digest):
        raise ContainerDiskInvalid(f"image {ref}: manifest digest {fits[0].digest!r} is not sha256")
    return fits[0]


def _layer(layers: list[_Descriptor], ref: Reference, max_bytes: int) -> Layer:
    """The containerDisk's one layer, checked before a byte of it is fetched."""
    if len(layers) != 1:
        raise ContainerDiskInvalid(
            f"image {ref} has {len(layers)} layers; a containerDisk has exactly one, "
            "holding disk/<file>"
        )
    layer = layers[0]
    if layer.media_type not in LAYER_TYPES:
        raise ContainerDiskInvalid(
            f"image {ref}: layer media type {layer.media_type!r} is not one of "
            f"{', '.join(sorted(LAYER_TYPES))}"
        )
    if layer.urls:
        raise ContainerDiskInvalid(f"image {ref}: a foreign layer (served from other URLs)")
    if not DIGEST.match(layer.digest):
        raise ContainerDiskInvalid(f"image {ref}: layer digest {layer.digest!r} is not sha256")
    if layer.size > max_bytes:
        raise over_fetch_limit(f"image {ref}: its layer is {layer.size} bytes, over", max_bytes)
    return Layer(layer.digest, layer.size, layer.media_type)
