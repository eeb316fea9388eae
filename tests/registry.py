"""A real OCI registry for tests: Debian's docker-registry (the CNCF distribution v2).

``Registry`` runs ``docker-registry serve`` on 127.0.0.1 with TLS off,
anonymous or behind ``TokenServer`` (the registry's own token auth: it
verifies the RS256 JWTs the token server signs with a generated key and
certificate).  Images are pushed with Debian's ``skopeo`` from an OCI layout
``oci_layout`` writes; ``blob_gets`` counts the registry's access-log lines.
"""

from __future__ import annotations

import base64
import datetime
import gzip as gzip_module
import hashlib
import io
import ipaddress
import json
import os
import re
import secrets
import socket
import subprocess
import tarfile
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def layer_tar(
    files: dict[str, bytes], *, members: Iterable[tarfile.TarInfo] = (), compress: str | None = None
) -> bytes:
    """A layer: ``disk/`` plus ``files`` (path -> bytes), then raw ``members`` (hostile ones)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        top = tarfile.TarInfo("disk")
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in members:
            tar.addfile(info)
    data = out.getvalue()
    if compress == "zstd":
        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return gzip_module.compress(data, compresslevel=1, mtime=0) if compress == "gzip" else data


@dataclass
class OciLayout:
    """An OCI image layout directory skopeo copies from (``oci:DIR:tag``)."""

    root: Path

    def __post_init__(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.refs: list[dict[str, object]] = []

    def blob(self, data: bytes, media_type: str, **extra: object) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}

    def image(self, layer: bytes, *, arch: str = "amd64") -> dict[str, object]:
        """An image manifest of one layer; returns its descriptor."""
        if layer.startswith(b"\x1f\x8b"):
            plain, media_type = gzip_module.decompress(layer), LAYER_GZIP
        elif layer.startswith(b"\x28\xb5\x2f\xfd"):
            plain, media_type = zstandard.ZstdDecompressor().decompress(layer), LAYER_ZSTD
        else:
            plain, media_type = layer, LAYER_TAR
        config = {
            "architecture": arch,
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(plain).hexdigest()],
            },
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(
                json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
            ),
            "layers": [self.blob(layer, media_type)],
        }
        return self.blob(
            json.dumps(manifest).encode(),
            OCI_MANIFEST,
            platform={"os": "linux", "architecture": arch},
        )

    def index(self, manifests: list[dict[str, object]]) -> dict[str, object]:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.blob(json.dumps(doc).encode(), OCI_INDEX)

    def tag(self, name: str, descriptor: dict[str, object]) -> None:
        ref = {k: v for k, v in descriptor.items() if k != "platform"}
        ref["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.refs.append(ref)
        index = {"schemaVersion": 2, "manifests": self.refs}
        (self.root / "index.json").write_text(json.dumps(index))


class TokenServer:
    """The registry's token endpoint: Basic login, then an RS256 JWT the registry verifies."""

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        self.users = users
        self.issued: list[str] = []  # the user (or "") of every token request
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmdisk test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def token(self, user: str, scope: str) -> str:
        kind, _, rest = scope.partition(":")
        repo, _, actions = rest.rpartition(":")
        now = int(time.time())
        claims = {
            "iss": "vmdisk-test",
            "sub": user,
            "aud": "vmdisk-registry",
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": [{"type": kind, "name": repo, "actions": actions.split(",")}],
        }
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{_b64(signature)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _bcrypt(password: str) -> str:
    """The htpasswd hash the registry checks (libcrypt's bcrypt, through the stdlib)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt leaves the stdlib in 3.13
        import crypt
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))  # cost 4: fast


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _TokenHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        owner: TokenServer = self.server.owner  # type: ignore[attr-defined]
        query = parse_qs(urlsplit(self.path).query)
        user = ""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if owner.users.get(user) != password:
                self._answer(401, {"details": "wrong credentials"})
                return
        owner.issued.append(user)
        if not user:  # anonymous pulls are not allowed on this registry
            self._answer(401, {"details": "login required"})
            return
        scope = query.get("scope", [""])[0]
        self._answer(200, {"token": owner.token(user, scope)})

    def _answer(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def tls_certificate(root: Path, address: str) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for ``address``: the registry's and its trust anchor."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmdisk test registry")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = root / "registry-cert.pem", root / "registry-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Registry:
    """``with Registry(tmp) as reg: reg.push(layout, "repo:tag")``; anonymous unless ``token``."""

    root: Path
    token: TokenServer | None = None
    address: str = "127.0.0.1"  # any 127/8 address: a second "host" for policy tests
    port: int = field(default_factory=free_port)
    tls: tuple[Path, Path] | None = None  # certificate and key: https instead of http
    htpasswd: dict[str, str] | None = None  # users and passwords: HTTP Basic auth

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def __enter__(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}},
            "http": {"addr": self.host},
        }
        if self.tls is not None:
            config["http"] = {
                "addr": self.host,
                "tls": {"certificate": str(self.tls[0]), "key": str(self.tls[1])},
            }
        if self.token is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": "vmdisk-registry",
                    "issuer": "vmdisk-test",
                    "rootcertbundle": str(self.token.bundle),
                }
            }
        if self.htpasswd is not None:
            users = self.root / "htpasswd"
            users.write_text("".join(f"{u}:{_bcrypt(pw)}\n" for u, pw in self.htpasswd.items()))
            config["auth"] = {"htpasswd": {"realm": "vmdisk-test", "path": str(users)}}
        path = self.root / "config.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.log = self.root / "registry.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(path)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"docker-registry did not start: {self.log.read_text()}"
                    ) from None
                time.sleep(0.05)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def push(
        self,
        layout: OciLayout,
        tag: str,
        repo: str,
        *,
        all_images: bool = False,
        creds: str | None = None,
        docker_v2: bool = False,
    ) -> None:
        """``skopeo copy oci:LAYOUT:tag docker://HOST/repo`` (``--all`` keeps an index)."""
        # --insecure-policy: no signature policy file of the host's is involved.
        argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
        if all_images:
            argv.append("--all")
        if docker_v2:  # Docker schema 2 manifests (and manifest lists) instead of OCI
            argv.append("--format=v2s2")
        if creds is not None:
            argv += ["--dest-creds", creds]
        argv += [f"oci:{layout.root}:{tag}", f"docker://{self.host}/{repo}"]
        env = {**os.environ, "HOME": str(self.root)}  # no user's auth.json
        subprocess.run(argv, check=True, env=env, capture_output=True, timeout=300)

    def digest(self, ref: str, creds: str | None = None) -> str:
        """The digest the registry serves ``ref`` (repo:tag) as: sha256 of its raw manifest."""
        argv = ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{self.host}/{ref}"]
        if creds is not None:
            argv[2:2] = ["--creds", creds]
        raw = subprocess.run(argv, check=True, capture_output=True, timeout=60).stdout
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def url(self, ref: str) -> str:
        return f"oci://{self.host}/{ref}"

    def blob_gets(self, digest: str, status: str = "200") -> int:
        """GETs of blob ``digest`` (sha256:<hex>) answered ``status`` in the access log.

        200: whole blobs (pulls); 206: ranged reads (the agent's one-byte checks).
        """
        pattern = re.compile(rf'"GET /v2/[^ ]+/blobs/{re.escape(digest)} HTTP/1\.1" {status} ')
        return len(pattern.findall(self.log.read_text(errors="replace")))
