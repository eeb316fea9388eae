"""Hostile image sources against real loopback servers: SSRF hops, rebinding, drips, endless
bodies, huge or swapped file:// sources.

Each test ends with a clear reason, asserts how long the refusal took, that nothing
outside the state directory changed and that no secret byte reached the state directory.
DNS answers come from an injected resolver (the only stand-in: this machine's resolver
cannot be pointed at a test DNS server); every connection is a real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import imagefactory as factory
from httpserver import ImageServer, Switches
from vmdisk.api.vmdisk import ImageSource
from vmdisk.config import Settings
from vmdisk.errors import DownloadFailed, ImageTooLarge, SourceNotAllowed, VMDiskError
from vmdisk.host import safeopen
from vmdisk.host.locks import file_lock
from vmdisk.images.cache import ImageCache
from vmdisk.images.fetchbounds import FetchLimits, max_fetch_bytes
from vmdisk.images.policy import SourcePolicy

MiB = factory.MiB
SECRET = b"host-secret-0123456789abcdef"


@pytest.fixture
def secret_server() -> Iterator[ImageServer]:
    """Stands for metadata or a cluster-internal service: another loopback address."""
    with ImageServer(host="127.0.0.2") as srv:
        srv.add("/latest/meta-data", SECRET * 1000)
        yield srv


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root`` except ``skip``: size, mtime and kind."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            if Path(dirpath, name) == skip:
                continue
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns, oct(st.st_mode))
    return found


def state_holds(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*") if root.exists() else ():
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        image_dir: Path,
        policy: SourcePolicy,
        limits: FetchLimits,
        resolve: Callable[[str, int], Sequence[str]] | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.cache = ImageCache(
            tmp_path / "state" / "cache",
            policy=policy,
            max_virtual_size=1024 * MiB,
            limits=limits,
            resolve=resolve,
        )
        self.before = snapshot(tmp_path, tmp_path / "state")
        self.entries = sorted(self.cache.root.glob("sha256-*"))

    def refuse(
        self, url: str, kind: type[VMDiskError], *, disk_size: int = 8 * MiB, within: float
    ) -> VMDiskError:
        started = time.monotonic()
        with pytest.raises(kind) as info:
            self.cache.get(ImageSource(url=url), disk_size=disk_size)
        elapsed = time.monotonic() - started
        assert elapsed < within, f"refusal took {elapsed:.1f}s"
        assert snapshot(self.tmp_path, self.tmp_path / "state") == self.before
        assert state_holds(self.tmp_path / "state", SECRET) == []
        assert sorted(self.cache.root.glob("sha256-*")) == self.entries
        return info.value


FAST = FetchLimits(timeout=2.0, retries=1, deadline=10.0, min_rate=64 * 1024, rate_window=1.0)
LOOPBACK_ONLY = SourcePolicy(allowed_hosts=("127.0.0.1/32",))


def test_loopback_is_refused_unless_a_cidr_names_it(
    tmp_path: Path, image_dir: Path, server: ImageServer
) -> None:
    url = server.add("/a.raw", factory.raw(tmp_path / "a.raw").read_bytes())
    for policy in (SourcePolicy(), SourcePolicy(allowed_hosts=("localhost", "127.0.0.1.nip"))):
        h = Harness(tmp_path, image_dir, policy, FAST)
        err = h.refuse(url, SourceNotAllowed, within=2.0)
        assert "loopback" in err.message and url in err.message
    assert server.gets("/a.raw") == []  # refused before connecting
    ok = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST)
    assert ok.cache.get(ImageSource(url=url), disk_size=8 * MiB).format == "raw"


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data", "metadata"),
        ("http://[::ffff:169.254.169.254]/x", "metadata"),
        ("http://[64:ff9b::a9fe:a9fe]/x", "metadata"),  # NAT64 of 169.254.169.254
        ("http://[2002:7f00:1::]/x", "loopback"),  # 6to4 of 127.0.0.1
        ("http://10.96.0.1/api", "cluster range 10.96.0.0/12"),
        ("http://0.0.0.0:{secret}/latest/meta-data", "unspecified"),
        ("http://127.0.0.2:{secret}/latest/meta-data", "loopback"),
        ("http://[::1]:{secret}/latest/meta-data", "loopback"),
        ("http://internal.example:{secret}/latest/meta-data", "loopback"),
    ],
)
def test_every_redirect_hop_is_checked(
    tmp_path: Path,
    image_dir: Path,
    server: ImageServer,
    secret_server: ImageServer,
    target: str,
    why: str,
) -> None:
    hop = target.format(secret=secret_server.port)
    server.redirects["/img.raw"] = server.url("/second")  # an allowed hop first
    server.redirects["/second"] = hop
    answers = {"internal.example": ["127.0.0.2"]}
    h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST, lambda host, port: answers[host])
    err = h.refuse(server.url("/img.raw"), SourceNotAllowed, within=2.0)
    assert why in err.message
    shown = hop.split("/latest")[0].split("/api")[0].split("/x")[0]
    assert shown.replace("[", "").split("//")[1].split(":")[0] in err.message.replace("[", "")
    assert secret_server.seen == []
    assert [s.path for s in server.seen] == ["/img.raw", "/second"]


def test_rebinding_cannot_move_the_connection(
    tmp_path: Path, image_dir: Path, server: ImageServer, secret_server: ImageServer
) -> None:
    """The name is resolved once per hop and the checked address is the one connected to."""
    img = factory.raw(tmp_path / "a.raw")
    server.add("/a.raw", img.read_bytes())
    secret_server.add("/a.raw", SECRET * 4096)
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)  # first answer passes the check, later ones point inside
        return ["127.0.0.1"] if len(calls) == 1 else ["127.0.0.2"]

    h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST, rebinding)
    url = f"http://images.rebind.test:{server.port}/a.raw"
    got = h.cache.get(ImageSource(url=url), disk_size=8 * MiB)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert calls == ["images.rebind.test"] and secret_server.seen == []
    assert state_holds(tmp_path / "state", SECRET) == []

    # A name answering with an allowed and a refused address is refused whole.
    both = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST, lambda h, p: ["127.0.0.1", "::1"])
    err = both.refuse(f"http://mixed.test:{server.port}/b.raw", SourceNotAllowed, within=2.0)
    assert "::1" in err.message and "mixed.test" in err.message


def test_a_dripping_server_is_given_up_on(
    tmp_path: Path, image_dir: Path, server: ImageServer
) -> None:
    server.switches = Switches(drip=0.05)
    url = server.add("/drip.raw", bytes(4 * MiB))
    h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST)
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="under the minimum of 65536 bytes/s") as info:
        h.cache.get(ImageSource(url=url), disk_size=8 * MiB)
    assert time.monotonic() - started < 4.0  # one 1 s window, no retry of a too-slow server
    assert "VMDISK_FETCH_MIN_RATE" in info.value.message


def test_an_overall_deadline_bounds_a_fast_enough_but_long_fetch(
    tmp_path: Path, image_dir: Path, server: ImageServer
) -> None:
    # One byte per wakeup: up to ~10 KB/s, and ~1 KB/s on a loaded machine (a full
    # run saw 908 B/s), so the floor is far below either: only the deadline stops it.
    server.switches = Switches(drip=0.0001)
    url = server.add("/long.raw", bytes(4 * MiB))
    limits = FetchLimits(timeout=2.0, retries=1, deadline=1.5, min_rate=64, rate_window=0.5)
    h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, limits)
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="deadline"):
        h.cache.get(ImageSource(url=url), disk_size=8 * MiB)
    assert 1.4 < time.monotonic() - started < 4.0


def test_an_endless_body_stops_at_the_disks_bound(
    tmp_path: Path, image_dir: Path, server: ImageServer
) -> None:
    server.switches = Switches(endless=True)
    h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST)
    err = h.refuse(server.url("/endless"), ImageTooLarge, disk_size=4 * MiB, within=5.0)
    assert str(max_fetch_bytes(4 * MiB, 1024 * MiB)) in err.message
    assert max_fetch_bytes(4 * MiB, 1024 * MiB) < 21 * MiB
    assert list((h.cache.root / "tmp").glob("*.part")) == []  # nothing half-kept


def test_a_declared_length_over_the_bound_is_refused_before_the_body(
    tmp_path: Path, image_dir: Path, server: ImageServer
) -> None:
    url = server.add("/big.raw", bytes(40 * MiB))
    server.switches = Switches(delay=30.0)  # the body would take 30 s to start
    h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST)
    err = h.refuse(url, ImageTooLarge, disk_size=4 * MiB, within=3.0)
    assert str(40 * MiB) in err.message


def test_credentials_stay_with_their_origin_and_out_of_the_state_dir(
    tmp_path: Path, image_dir: Path, server: ImageServer
) -> None:
    img = factory.raw(tmp_path / "a.raw")
    with ImageServer() as other:
        other.add("/a.raw", img.read_bytes())
        server.redirects["/a.raw"] = other.url("/a.raw")
        h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST)
        url = server.url("/a.raw").replace("http://", "http://user:s3cr3t-pw@")
        assert h.cache.get(ImageSource(url=url), disk_size=8 * MiB).format == "raw"
        assert server.seen[0].authorization == "Basic dXNlcjpzM2NyM3QtcHc="
        assert other.seen[0].authorization is None  # same host, other port: other origin
    assert state_holds(tmp_path / "state", b"s3cr3t-pw") == []


def test_a_huge_sparse_file_is_refused_before_hashing(tmp_path: Path, image_dir: Path) -> None:
    huge = image_dir / "huge.raw"
    with open(huge, "wb") as handle:
        handle.truncate(8 * 1024**4)  # 8 TiB of holes
    h = Harness(tmp_path, image_dir, SourcePolicy(file_dirs=(image_dir,)), FAST)
    err = h.refuse(huge.as_uri(), ImageTooLarge, disk_size=4 * MiB, within=2.0)
    assert str(8 * 1024**4) in err.message


def test_a_fifo_or_a_nul_byte_is_refused_without_hanging(
    tmp_path: Path, image_dir: Path, resolver_kind: str
) -> None:
    os.mkfifo(image_dir / "pipe.raw")
    h = Harness(tmp_path, image_dir, SourcePolicy(file_dirs=(image_dir,)), FAST)
    h.refuse((image_dir / "pipe.raw").as_uri(), SourceNotAllowed, within=2.0)
    err = h.refuse(f"file://{image_dir}/a%00.raw", SourceNotAllowed, within=2.0)
    assert "NUL" in err.message


@pytest.fixture(params=["openat2", "O_NOFOLLOW walk"])
def resolver_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of opening without links: openat2 (this kernel) and the per-component walk."""
    if request.param != "openat2":
        monkeypatch.setattr(safeopen, "_openat2_works", False)
    return str(request.param)


def test_a_directory_swapped_for_a_symlink_while_waiting_for_the_lock(
    tmp_path: Path, image_dir: Path, resolver_kind: str
) -> None:
    """The swap happens while get() waits for the cache lock, after every lexical check."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "disk.raw").write_bytes(SECRET * 4096)
    (image_dir / "v1").mkdir()
    img = factory.raw(image_dir / "v1" / "disk.raw")
    h = Harness(tmp_path, image_dir, SourcePolicy(file_dirs=(image_dir,)), FAST)
    source = ImageSource(url=(image_dir / "v1" / "disk.raw").as_uri(), checksum=None)
    key = "url-" + __import__("hashlib").sha256(source.url.encode()).hexdigest()
    outcome: list[BaseException | object] = []
    with file_lock(h.cache.root / "locks" / f"{key}.lock"):
        worker = threading.Thread(
            target=lambda: outcome.append(_get_or_error(h.cache, source)), daemon=True
        )
        worker.start()
        time.sleep(0.3)  # get() parsed the URL and now blocks on the lock
        assert worker.is_alive()
        os.rename(image_dir / "v1", tmp_path / "v1-moved")
        (image_dir / "v1").symlink_to(host)
        h.before = snapshot(tmp_path, tmp_path / "state")
    worker.join(10)
    assert not worker.is_alive()
    (err,) = outcome
    assert isinstance(err, SourceNotAllowed), err
    assert "symbolic link" in err.message
    assert state_holds(tmp_path / "state", SECRET) == []
    assert snapshot(tmp_path, tmp_path / "state") == h.before
    assert (tmp_path / "v1-moved" / img.name).is_file()  # the real image moved away intact


def _get_or_error(cache: ImageCache, source: ImageSource) -> BaseException | object:
    try:
        return cache.get(source, disk_size=8 * MiB)
    except BaseException as exc:  # handed to the test thread
        return exc


def _tls_server(tmp_path: Path, name: str, body: bytes) -> tuple[Iterator[int], Path]:
    """A real TLS server on 127.0.0.1 with a self-signed certificate for ``name``."""
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return _serve_tls(key, cert, body), cert


def _serve_tls(key: Path, cert: Path, body: bytes) -> Iterator[int]:
    import http.server
    import ssl

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_verifies_the_name_while_connecting_to_the_checked_address(
    tmp_path: Path, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = factory.raw(tmp_path / "a.raw")
    server, cert = _tls_server(tmp_path, "images.tls.test", img.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust this one certificate
    resolve = {"images.tls.test": ["127.0.0.1"], "other.tls.test": ["127.0.0.1"]}
    port = next(server)
    try:
        h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST, lambda host, p: resolve[host])
        got = h.cache.get(ImageSource(url=f"https://images.tls.test:{port}/a.raw"), disk_size=None)
        assert factory.sha256(got.path) == factory.sha256(img)
        # The same address under a name the certificate does not carry: refused.
        h = Harness(tmp_path, image_dir, LOOPBACK_ONLY, FAST, lambda host, p: resolve[host])
        err = h.refuse(f"https://other.tls.test:{port}/a.raw", DownloadFailed, within=10.0)
        assert "certificate" in err.message.lower() or "hostname" in err.message.lower()
    finally:
        server.close()


def test_the_bounds_and_the_policy_come_from_settings(tmp_path: Path) -> None:
    env = {
        "VMDISK_IMAGE_HOSTS": "images.example.com, 10.20.0.0/16",
        "VMDISK_CLUSTER_CIDRS": "10.96.0.0/12,fd00:10:96::/108",
        "VMDISK_FETCH_DEADLINE": "2h",
        "VMDISK_FETCH_MIN_RATE": "1Mi",
        "VMDISK_FETCH_RATE_WINDOW": "30s",
        "VMDISK_FETCH_TIMEOUT": "15s",
    }
    settings = Settings.from_env(env, state_dir=tmp_path)
    assert settings.image_hosts == ("images.example.com", "10.20.0.0/16")
    assert settings.cluster_cidrs == ("10.96.0.0/12", "fd00:10:96::/108")
    limits = FetchLimits.from_settings(settings)
    assert (limits.deadline, limits.min_rate, limits.rate_window, limits.timeout) == (
        7200.0,
        1024**2,
        30.0,
        15.0,
    )
    assert Settings.from_env({"VMDISK_IMAGE_HOSTS": " "}).image_hosts is None
    for key, bad in [
        ("VMDISK_IMAGE_HOSTS", "10.0.0.0/33"),
        ("VMDISK_FETCH_MIN_RATE", "fast"),
        ("VMDISK_FETCH_DEADLINE", "0"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "vmdisk.cli", "get", "vmdisks", "--state-dir", str(tmp_path)],
            env={**os.environ, key: bad},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (key, result.stderr)
        assert result.stderr.startswith(f"error: {key}") and "Traceback" not in result.stderr
