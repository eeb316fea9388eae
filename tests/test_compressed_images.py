"""Compressed images (gzip, xz, zstd, bzip2) decompressed while they stream.

Every compressed file here is made by the real compressor (Debian's
``gzip``, ``xz``, ``zstd``, ``bzip2``); disks are made by the real
``vmdisk apply`` and compared with the original by ``qemu-img compare``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import imagefactory as factory
from httpserver import ImageServer
from test_cli import vmdisk, vmdisk_doc, write_manifests
from test_images import cache_files
from vmdisk.api.vmdisk import ImageSource
from vmdisk.errors import (
    ChecksumMismatch,
    DecompressedTooLarge,
    DecompressionFailed,
    ImageUnsafe,
)
from vmdisk.images.cache import ImageCache
from vmdisk.images.fetchbounds import FetchLimits
from vmdisk.images.policy import SourcePolicy

MiB = factory.MiB
GiB = 1024 * MiB
COMPRESSORS = {
    "gzip": ["gzip", "-c", "-6"],
    "xz": ["xz", "-c", "-T1", "-3"],
    "zstd": ["zstd", "-c", "-q", "-3"],
    "bzip2": ["bzip2", "-c", "-9"],
}
SUFFIX = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2"}


def compress(kind: str, source: Path, target: Path | None = None) -> Path:
    """``source`` compressed by the real ``kind`` tool."""
    target = target or source.with_name(source.name + SUFFIX[kind])
    with open(source, "rb") as src, open(target, "wb") as out:
        subprocess.run(COMPRESSORS[kind], stdin=src, stdout=out, check=True, timeout=120)
    return target


def zeros_compressed(kind: str, size: int, target: Path) -> Path:
    """``size`` zero bytes compressed by the real tool, streamed (no big file on disk)."""
    with open(target, "wb") as out:
        proc = subprocess.Popen(COMPRESSORS[kind], stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        block = bytes(4 * MiB)
        for _ in range(size // len(block)):
            proc.stdin.write(block)
        proc.stdin.close()
        assert proc.wait(timeout=300) == 0
    return target


def same_content(a: Path, fmt_a: str, b: Path, fmt_b: str) -> None:
    result = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def make_cache(tmp_path: Path, image_dir: Path) -> Callable[..., ImageCache]:
    def make(retries: int = 3) -> ImageCache:
        return ImageCache(
            tmp_path / "cache",
            policy=SourcePolicy(allowed_hosts=("127.0.0.1/32",), file_dirs=(image_dir,)),
            max_virtual_size=GiB,
            limits=FetchLimits(timeout=5.0, retries=retries),
        )

    return make


@pytest.fixture
def cache(make_cache: Callable[..., ImageCache]) -> ImageCache:
    return make_cache()


def checked(path: Path) -> ImageSource:
    return ImageSource(url="", checksum=factory.checksum(path))


# --- each format, end to end ---------------------------------------------------


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("via", ["http", "file"])
def test_each_format_to_a_ready_disk_equal_to_the_original(
    kind: str, via: str, tmp_path: Path, image_dir: Path, server: ImageServer
) -> None:
    # qcow2 over http into a qcow2 disk, raw (with a hole) from a file into a raw disk.
    fmt = "qcow2" if via == "http" else "raw"
    original = tmp_path / f"base.{fmt}"
    factory.qcow2(original, size=6 * MiB) if fmt == "qcow2" else factory.raw(original, 6 * MiB)
    # A name that says nothing: the format is told by the bytes.
    packed = compress(kind, original, image_dir / "base.img")
    url = server.add("/base.img", packed.read_bytes()) if via == "http" else packed.as_uri()
    manifest = write_manifests(
        tmp_path / "disk.yaml",
        vmdisk_doc(
            "root",
            backend=fmt,
            size="16Mi",
            source={"image": {"url": url, "checksum": factory.checksum(packed), "format": fmt}},
        ),
    )
    state = tmp_path / "state"
    result = vmdisk("apply", "-f", str(manifest), state=state, image_dir=image_dir)
    assert result.returncode == 0, result.stderr
    disk = json.loads(vmdisk("get", "vmdisk", "root", "-o", "json", state=state).stdout)["status"]
    assert disk["phase"] == "Ready"
    assert disk["baseImage"] == f"sha256-{factory.sha256(packed)}"  # what was fetched
    same_content(Path(disk["path"]), fmt, original, fmt)

    listing = vmdisk("cache", "list", "-o", "json", state=state)
    (entry,) = json.loads(listing.stdout)["items"]
    assert entry["source_kind"] == f"{via}+{kind}"
    assert f"{via}+{kind}" in vmdisk("cache", "list", state=state).stdout
    assert [p.name for p in (state / "cache" / "tmp").iterdir()] == []


def test_a_plain_image_named_like_a_compressed_one_is_not_decompressed(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw")
    url = server.add("/a.raw.xz", img.read_bytes())
    got = cache.get(ImageSource(url=url, checksum=factory.checksum(img)), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert cache.index.entries(set())[0].source_kind == "http"


def test_decompressed_image_goes_through_the_safety_checks(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    host_file = tmp_path / "secret"
    host_file.write_bytes(b"host data")
    hostile = compress("xz", factory.qcow2_with_backing(tmp_path / "x.qcow2", host_file))
    url = server.add("/x.qcow2.xz", hostile.read_bytes())
    with pytest.raises(ImageUnsafe):
        cache.get(ImageSource(url=url, checksum=factory.checksum(hostile)), disk_size=None)
    assert cache_files(cache) == []


def test_checksum_is_of_the_compressed_bytes(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw")
    packed = compress("zstd", img)
    url = server.add("/a.zst", packed.read_bytes())
    with pytest.raises(ChecksumMismatch):  # the image's own digest is not what was fetched
        cache.get(ImageSource(url=url, checksum=factory.checksum(img)), disk_size=None)
    assert cache_files(cache) == []


# --- bombs and corrupt streams ---------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "xz"])
@pytest.mark.parametrize("via", ["http", "file"])
def test_decompression_bomb_stops_at_the_disk_bound(
    kind: str, via: str, cache: ImageCache, server: ImageServer, image_dir: Path
) -> None:
    bomb = zeros_compressed(kind, 512 * MiB, image_dir / f"bomb{SUFFIX[kind]}")
    assert bomb.stat().st_size < 2 * MiB  # small on the wire, 512 MiB unpacked
    url = server.add("/bomb", bomb.read_bytes()) if via == "http" else bomb.as_uri()
    started = time.monotonic()
    with pytest.raises(DecompressedTooLarge) as info:
        cache.get(ImageSource(url=url, checksum=factory.checksum(bomb)), disk_size=8 * MiB)
    assert info.value.reason == "DecompressedTooLarge"
    assert info.value.permanent
    assert kind in info.value.message
    assert time.monotonic() - started < 30  # stopped near the bound, not at the end
    assert cache_files(cache) == []


def _truncated(kind: str, packed: Path) -> bytes:
    return packed.read_bytes()[: packed.stat().st_size // 2]


def _flipped(kind: str, packed: Path) -> bytes:
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _trailing(kind: str, packed: Path) -> bytes:
    return packed.read_bytes() + b"not a compressed stream"


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("damage", [_truncated, _flipped, _trailing], ids=lambda f: f.__name__)
def test_corrupt_stream_refused_with_its_reason_and_nothing_left(
    kind: str,
    damage: Callable[[str, Path], bytes],
    cache: ImageCache,
    server: ImageServer,
    tmp_path: Path,
) -> None:
    img = factory.raw(tmp_path / "a.raw", size=4 * MiB)
    bad = tmp_path / "bad"
    bad.write_bytes(damage(kind, compress(kind, img)))
    url = server.add("/bad", bad.read_bytes())
    with pytest.raises(DecompressionFailed) as info:
        cache.get(ImageSource(url=url, checksum=factory.checksum(bad)), disk_size=None)
    assert info.value.reason == "DecompressionFailed"
    assert info.value.permanent
    assert kind in info.value.message
    assert cache_files(cache) == []


# --- resume ----------------------------------------------------------------------


def test_dropped_compressed_download_resumes_at_the_compressed_offset(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw", size=24 * MiB)
    packed = compress("xz", img)
    url = server.add("/a.xz", packed.read_bytes())
    server.switches.drop_once_after = packed.stat().st_size // 2
    got = cache.get(ImageSource(url=url, checksum=factory.checksum(packed)), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    seen = server.gets("/a.xz")
    assert [s.status for s in seen] == [200, 206]
    assert seen[1].range is not None
    assert int(seen[1].range[6:-1]) >= packed.stat().st_size // 4


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_compressed_partial_left_by_a_crash_is_decompressed_again_and_resumed(
    kind: str, cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw", size=8 * MiB)
    packed = compress(kind, img)
    url = server.add("/a", packed.read_bytes())
    half = packed.stat().st_size // 2
    cache.tmp_dir.mkdir(parents=True)
    part = cache.tmp_dir / f"sha256-{factory.sha256(packed)}.part"
    part.write_bytes(packed.read_bytes()[:half])
    got = cache.get(ImageSource(url=url, checksum=factory.checksum(packed)), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert [(s.status, s.range) for s in server.gets("/a")] == [(206, f"bytes={half}-")]
    assert cache_files(cache) == sorted([got.id, f"{got.id}.json"])


def test_failed_compressed_download_keeps_only_the_compressed_partial(
    make_cache: Callable[..., ImageCache], server: ImageServer, tmp_path: Path
) -> None:
    cache = make_cache(retries=0)
    img = factory.raw(tmp_path / "a.raw", size=8 * MiB)
    packed = compress("bzip2", img)
    url = server.add("/a.bz2", packed.read_bytes())
    server.switches.drop_once_after = packed.stat().st_size // 2
    source = ImageSource(url=url, checksum=factory.checksum(packed))
    with pytest.raises(Exception, match="kept for resume"):
        cache.get(source, disk_size=None)
    assert [p for p in cache_files(cache) if not p.endswith(".json")] == [
        f"tmp/sha256-{factory.sha256(packed)}.part"
    ]
    got = cache.get(source, disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert [s.status for s in server.gets("/a.bz2")] == [200, 206]


def test_progress_counts_compressed_bytes_and_logs_decompressed_ones(
    cache: ImageCache, server: ImageServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    img = factory.raw(tmp_path / "a.raw", size=8 * MiB)
    packed = compress("gzip", img)
    url = server.add("/a.gz", packed.read_bytes())
    calls: list[tuple[int, int | None]] = []
    with caplog.at_level("INFO", logger="vmdisk.images"):
        cache.get(
            ImageSource(url=url, checksum=factory.checksum(packed)),
            disk_size=None,
            progress=lambda done, total: calls.append((done, total)),
        )
    size = packed.stat().st_size
    assert calls[-1] == (size, size)
    assert f"{img.stat().st_size} bytes decompressed (gzip) from {size}" in caplog.text
