"""The image cache against a real loopback HTTP server and the real qemu-img."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import imagefactory as factory
from httpserver import ImageServer
from vmdisk.api.vmdisk import ImageSource
from vmdisk.backends.base import BaseImage
from vmdisk.errors import (
    ChecksumMismatch,
    DownloadFailed,
    ImageCorrupt,
    ImageError,
    ImageFormatMismatch,
    ImageFormatUnsupported,
    ImageLargerThanDisk,
    ImageTooLarge,
    ImageUnsafe,
    SourceNotAllowed,
)
from vmdisk.host import qemu_img
from vmdisk.images.cache import ImageCache
from vmdisk.images.fetchbounds import FetchLimits
from vmdisk.images.policy import SourcePolicy
from vmdisk.images.stream import BufferRing, SparseFile, Tee

MiB = factory.MiB
GiB = 1024 * MiB


def loopback_policy(image_dir: Path) -> SourcePolicy:
    """The test server lives on loopback, which only an explicit CIDR allows."""
    return SourcePolicy(allowed_hosts=("127.0.0.1/32",), file_dirs=(image_dir,))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def make_cache(tmp_path: Path, image_dir: Path) -> Callable[..., ImageCache]:
    def make(**kwargs: float) -> ImageCache:
        options: dict[str, float] = {"timeout": 5.0, "retries": 3, **kwargs}
        return ImageCache(
            tmp_path / "cache",
            policy=loopback_policy(image_dir),
            max_virtual_size=GiB,
            limits=FetchLimits(timeout=options["timeout"], retries=int(options["retries"])),
        )

    return make


@pytest.fixture
def cache(make_cache: Callable[..., ImageCache]) -> ImageCache:
    return make_cache()


def cache_files(cache: ImageCache) -> list[str]:
    """Images, metadata and partials: what must not remain after a refusal."""
    found = [p.name for p in cache.root.glob("sha256-*")]
    if cache.tmp_dir.exists():
        found += [f"tmp/{p.name}" for p in cache.tmp_dir.iterdir()]
    return sorted(found)


def source(url: str, path: Path | None = None, fmt: str | None = None) -> ImageSource:
    return ImageSource(url=url, checksum=factory.checksum(path) if path else None, format=fmt)


# --- happy paths -------------------------------------------------------------


def test_http_qcow2_is_cached_read_only_and_reused(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.qcow2(tmp_path / "a.qcow2")
    url = server.add("/a.qcow2", img.read_bytes())
    calls: list[tuple[int, int | None]] = []

    got = cache.get(
        source(url, img, "qcow2"), disk_size=8 * MiB, progress=lambda d, t: calls.append((d, t))
    )

    assert got == BaseImage(f"sha256-{factory.sha256(img)}", got.path, "qcow2", 4 * MiB)
    assert got.path == cache.root / got.id
    assert stat.S_IMODE(got.path.stat().st_mode) == 0o444
    assert factory.sha256(got.path) == factory.sha256(img)
    assert (cache.root / f"{got.id}.json").exists()
    assert cache.lookup(got.id) == got
    assert calls[-1] == (img.stat().st_size, img.stat().st_size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) >= 2

    os.utime(got.path, (1000, 1000))
    assert cache.get(source(url, img, "qcow2"), disk_size=None) == got
    assert len(server.gets("/a.qcow2")) == 1
    assert got.path.stat().st_mtime > 1000  # touched on use, like Nova
    assert cache_files(cache) == sorted([got.id, f"{got.id}.json"])


def test_url_without_checksum_is_downloaded_once(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw")
    url = server.add("/a.raw", img.read_bytes())
    first = cache.get(source(url), disk_size=None)
    second = cache.get(source(url, fmt="raw"), disk_size=None)
    assert first == second
    assert first.format == "raw"
    assert first.id == f"sha256-{factory.sha256(img)}"
    assert len(server.gets("/a.raw")) == 1


def test_http_download_keeps_holes(cache: ImageCache, server: ImageServer, tmp_path: Path) -> None:
    img = factory.raw(tmp_path / "holes.raw", size=8 * MiB)
    url = server.add("/holes.raw", img.read_bytes())  # served as plain bytes, zeroes included
    got = cache.get(source(url, img, "raw"), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert got.path.stat().st_size == 8 * MiB
    # The zero half became a hole (ext4 may count an extent-tree block on top).
    assert got.path.stat().st_blocks * 512 <= 4 * MiB + 64 * 1024


def _patchwork(size: int) -> bytes:
    """Data and zero runs of awkward lengths: holes, 4 KiB-unaligned edges, a ragged end."""
    rng = random.Random(18)
    out = bytearray()
    while len(out) < size:
        n = rng.choice([1, 4095, 4097, 64 * 1024, 3 * 64 * 1024 + 7, MiB, 3 * MiB + 123])
        out += bytes(n) if rng.random() < 0.4 else rng.randbytes(n)
    return bytes(out[: size - 777])


def test_http_download_of_ragged_data_resumed_mid_page(
    cache: ImageCache, server: ImageServer
) -> None:
    """Reused receive buffers and the O_DIRECT writer: every byte lands, zeros stay holes.

    The drop falls inside a 4 KiB page, so the resumed stream starts at an
    unaligned offset (its head goes through the page cache, the rest direct).
    """
    data = _patchwork(40 * MiB)
    url = server.add("/ragged.raw", data)
    server.switches.drop_once_after = 9 * MiB + 1234
    got = cache.get(
        ImageSource(url=url, checksum=f"sha256:{hashlib.sha256(data).hexdigest()}", format="raw"),
        disk_size=None,
    )
    assert got.path.read_bytes() == data
    assert [s.status for s in server.gets("/ragged.raw")] == [200, 206]
    zero_pieces = sum(
        1 for at in range(0, len(data) - 64 * 1024, 64 * 1024) if not any(data[at : at + 64 * 1024])
    )
    assert zero_pieces > 20  # the patchwork has holes to keep
    assert got.path.stat().st_blocks * 512 <= len(data) - (zero_pieces - 2) * 64 * 1024


def test_sparse_file_writes_ring_slots_and_bytes_alike(tmp_path: Path) -> None:
    """SparseFile fed bytes, ring slots and a resumed prefix writes the same file as plain I/O."""
    data = _patchwork(24 * MiB)
    ring = BufferRing(slots=2, size=3 * MiB + 4096)
    for present, offset in [(0, 0), (5000, 0), (70_001, 123)]:
        path = tmp_path / f"out-{present}-{offset}"
        path.write_bytes(b"\xaa" * offset + data[:present])
        fd = os.open(path, os.O_WRONLY)
        try:
            out = SparseFile(fd, offset, present=present)
            tee = Tee([out])
            pos, turn = 0, 0
            while pos < len(data):
                turn += 1
                if turn % 2:  # a ring slot, filled whole but for the last
                    slot = ring.take()
                    piece = data[pos : pos + len(slot)]
                    slot[: len(piece)] = piece
                    tee.put((slot[: len(piece)],), done=lambda slot=slot: ring.give(slot))
                else:  # plain bytes in a few chunks
                    piece = data[pos : pos + 2 * MiB + 17]
                    tee.put((piece[:1000], piece[1000:]))
                pos += len(piece)
            tee.close()
            os.ftruncate(fd, out.end)
        finally:
            os.close(fd)
        assert path.read_bytes() == b"\xaa" * offset + data

    def lost() -> None:
        raise AssertionError("a ring slot never came back")

    assert len({id(ring.take(lost)) for _ in range(2)}) == 2  # every slot came back


def test_file_source_copies_sparse(cache: ImageCache, image_dir: Path) -> None:
    img = factory.raw(image_dir / "disk.raw", size=8 * MiB)
    got = cache.get(source(img.as_uri(), img, "raw"), disk_size=8 * MiB)
    assert got.format == "raw" and got.virtual_size == 8 * MiB
    assert factory.sha256(got.path) == factory.sha256(img)
    assert got.path.stat().st_blocks * 512 < 8 * MiB  # the hole stayed a hole


def test_cached_entry_still_checked_against_each_disk(cache: ImageCache, image_dir: Path) -> None:
    img = factory.qcow2(image_dir / "disk.qcow2", size=4 * MiB)
    cache.get(source(img.as_uri(), img), disk_size=None)
    with pytest.raises(ImageLargerThanDisk) as info:
        cache.get(source(img.as_uri(), img), disk_size=MiB)
    assert info.value.reason == "ImageLargerThanDisk"
    with pytest.raises(ImageFormatMismatch):
        cache.get(source(img.as_uri(), img, "raw"), disk_size=None)


# --- sources that are not allowed --------------------------------------------


def test_file_outside_image_dirs_refused(cache: ImageCache, tmp_path: Path) -> None:
    outside = factory.raw(tmp_path / "outside.raw")
    with pytest.raises(SourceNotAllowed) as info:
        cache.get(source(outside.as_uri()), disk_size=None)
    assert info.value.reason == "SourceNotAllowed"
    assert str(tmp_path / "images") in info.value.message
    assert cache_files(cache) == []


def test_symlink_escaping_image_dirs_refused(
    cache: ImageCache, image_dir: Path, tmp_path: Path
) -> None:
    (image_dir / "sneaky.raw").symlink_to("/etc/passwd")
    with pytest.raises(SourceNotAllowed):
        cache.get(source((image_dir / "sneaky.raw").as_uri()), disk_size=None)
    (image_dir / "link.raw").symlink_to(factory.raw(tmp_path / "x.raw"))
    with pytest.raises(SourceNotAllowed):
        cache.get(source((image_dir / "link.raw").as_uri()), disk_size=None)
    with pytest.raises(SourceNotAllowed):
        cache.get(source(f"file://{image_dir}/../x.raw"), disk_size=None)
    assert cache_files(cache) == []


def test_other_schemes_refused(cache: ImageCache) -> None:
    with pytest.raises(SourceNotAllowed, match="rbd://"):
        cache.get(source("rbd://pool/image"), disk_size=None)


def test_redirects_only_between_http_urls(
    cache: ImageCache, server: ImageServer, tmp_path: Path, image_dir: Path
) -> None:
    img = factory.raw(image_dir / "a.raw")
    server.add("/real.raw", img.read_bytes())
    server.redirects["/hop.raw"] = server.url("/real.raw")
    assert cache.get(source(server.url("/hop.raw"), img), disk_size=None).format == "raw"

    server.redirects["/evil.raw"] = img.as_uri()  # even an allowed file is refused
    with pytest.raises(SourceNotAllowed, match="redirected"):
        cache.get(source(server.url("/evil.raw")), disk_size=None)
    assert [p for p in cache_files(cache) if "tmp/" in p] == []


# --- hostile and unusable images ---------------------------------------------

HOSTILE: dict[str, tuple[Callable[[Path], Path], type[ImageError], str | None]] = {
    "backing-file": (
        lambda d: factory.qcow2_with_backing(d / "x.qcow2", d / "hostname"),
        ImageUnsafe,
        "backing_file",
    ),
    "data-file": (
        lambda d: factory.qcow2_with_data_file(d / "x.qcow2", d / "data.raw"),
        ImageUnsafe,
        "data_file",
    ),
    "vmdk-descriptor": (
        lambda d: factory.vmdk_descriptor(d / "x.img", d / "hostname"),
        ImageUnsafe,
        "descriptor",
    ),
    "vmdk-descriptor-seen-as-raw": (
        lambda d: factory.vmdk_descriptor(d / "x.img", d / "hostname", evade_inspector=True),
        ImageUnsafe,
        "VMDK descriptor",
    ),
    "petabyte": (lambda d: factory.huge_qcow2(d / "x.qcow2"), ImageTooLarge, None),
    "qcow2-declared-raw": (lambda d: factory.qcow2(d / "x.qcow2"), ImageFormatMismatch, "raw"),
    "vmdk": (lambda d: factory.vmdk(d / "x.vmdk"), ImageFormatUnsupported, "vmdk"),
    "corrupt": (lambda d: factory.corrupt_qcow2(d / "x.qcow2"), ImageCorrupt, "check"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_image_refused_and_leaves_nothing(
    case: str, cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    build, error, fragment = HOSTILE[case]
    img = build(tmp_path)
    if case == "corrupt":
        assert factory.qemu_img_check_fails(img)  # the scribble really corrupts it
    url = server.add("/x", img.read_bytes())
    declared = "raw" if case == "qcow2-declared-raw" else None
    with pytest.raises(error) as info:
        cache.get(source(url, img, declared), disk_size=None)
    assert info.value.reason == error.reason
    assert info.value.permanent
    if fragment:
        assert fragment in info.value.message
    assert cache_files(cache) == []


def test_image_larger_than_disk_refused(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.qcow2(tmp_path / "a.qcow2", size=4 * MiB)
    url = server.add("/a.qcow2", img.read_bytes())
    with pytest.raises(ImageLargerThanDisk, match=r"spec\.size"):
        cache.get(source(url, img), disk_size=2 * MiB)
    assert cache_files(cache) == []


def test_checksum_mismatch_http_and_file(
    cache: ImageCache, server: ImageServer, image_dir: Path
) -> None:
    img = factory.raw(image_dir / "a.raw")
    server.switches.wrong_bytes = True
    with pytest.raises(ChecksumMismatch) as info:
        cache.get(source(server.add("/a.raw", img.read_bytes()), img), disk_size=None)
    assert factory.sha256(img) in info.value.message
    other = factory.raw(image_dir / "b.raw", seed=2)
    wrong = ImageSource(url=img.as_uri(), checksum=factory.checksum(other))
    with pytest.raises(ChecksumMismatch):
        cache.get(wrong, disk_size=None)
    assert cache_files(cache) == []


# --- interrupted downloads ---------------------------------------------------


def test_resume_after_dropped_connection(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw", size=8 * MiB)
    url = server.add("/a.raw", img.read_bytes())
    server.switches.drop_once_after = 3 * MiB
    got = cache.get(source(url, img), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    seen = server.gets("/a.raw")
    assert [s.status for s in seen] == [200, 206]
    assert seen[1].range is not None and seen[1].range.startswith("bytes=")
    assert int(seen[1].range[6:-1]) >= 3 * MiB


def test_server_without_ranges_restarts(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw", size=8 * MiB)
    url = server.add("/a.raw", img.read_bytes())
    server.switches.ranges = False
    server.switches.drop_once_after = 3 * MiB
    got = cache.get(source(url, img), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert [s.status for s in server.gets("/a.raw")] == [200, 200]


def test_stalled_server_times_out_and_resumes(
    make_cache: Callable[..., ImageCache], server: ImageServer, tmp_path: Path
) -> None:
    cache = make_cache(timeout=0.3)
    img = factory.raw(tmp_path / "a.raw", size=4 * MiB)
    url = server.add("/a.raw", img.read_bytes())
    server.switches.stall_once_after = MiB
    server.switches.stall_seconds = 3.0
    got = cache.get(source(url, img), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert [s.status for s in server.gets("/a.raw")] == [200, 206]


def test_partial_left_by_a_crash_is_hashed_and_resumed(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.raw(tmp_path / "a.raw", size=4 * MiB)
    url = server.add("/a.raw", img.read_bytes())
    cache.tmp_dir.mkdir(parents=True)
    part = cache.tmp_dir / f"sha256-{factory.sha256(img)}.part"
    part.write_bytes(img.read_bytes()[: 3 * MiB])
    got = cache.get(source(url, img), disk_size=None)
    assert factory.sha256(got.path) == factory.sha256(img)
    assert [(s.status, s.range) for s in server.gets("/a.raw")] == [(206, f"bytes={3 * MiB}-")]
    assert cache_files(cache) == sorted([got.id, f"{got.id}.json"])


def test_failed_download_keeps_partial_for_the_next_attempt(
    make_cache: Callable[..., ImageCache], server: ImageServer, tmp_path: Path
) -> None:
    cache = make_cache(retries=0)
    img = factory.raw(tmp_path / "a.raw", size=4 * MiB)
    url = server.add("/a.raw", img.read_bytes())
    server.switches.drop_once_after = 2 * MiB
    with pytest.raises(DownloadFailed):
        cache.get(source(url), disk_size=None)
    assert [p for p in cache_files(cache) if p.endswith(".part")] != []
    got = cache.get(source(url), disk_size=None)  # no checksum: If-Range guards the resume
    assert factory.sha256(got.path) == factory.sha256(img)
    assert [s.status for s in server.gets("/a.raw")] == [200, 206]
    assert cache_files(cache) == sorted([got.id, f"{got.id}.json"])


def test_unreachable_server_is_a_temporary_failure(
    make_cache: Callable[..., ImageCache], server: ImageServer
) -> None:
    cache = make_cache(retries=1)
    with pytest.raises(DownloadFailed) as info:
        cache.get(source(server.url("/missing.raw")), disk_size=None)
    assert info.value.permanent is False and "404" in info.value.message
    with pytest.raises(DownloadFailed, match="2 attempts"):
        cache.get(source("http://127.0.0.1:9/nothing.raw"), disk_size=None)


# --- concurrency -------------------------------------------------------------

_CHILD = """
import sys
from pathlib import Path
from vmdisk.api.vmdisk import ImageSource
from vmdisk.images.cache import ImageCache
from vmdisk.images.fetchbounds import FetchLimits
from vmdisk.images.policy import SourcePolicy
policy = SourcePolicy(allowed_hosts=("127.0.0.1/32",))
cache = ImageCache(Path(sys.argv[1]), policy=policy, max_virtual_size=2**30)
print(cache.get(ImageSource(url=sys.argv[2], checksum=sys.argv[3]), disk_size=None).path)
"""


def test_threads_and_processes_download_once(
    cache: ImageCache, server: ImageServer, tmp_path: Path
) -> None:
    img = factory.qcow2(tmp_path / "a.qcow2")
    url = server.add("/a.qcow2", img.read_bytes())
    server.switches.delay = 1.0  # keep the first download in flight while others queue
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "operator")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(cache.root), url, factory.checksum(img)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    results: list[BaseImage] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(source(url, img), disk_size=None)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outputs = [proc.communicate(timeout=30)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    assert len(results) == 8 and len(set(results)) == 1
    assert set(outputs) == {str(results[0].path)}
    assert len(server.gets("/a.qcow2")) == 1


# --- listing and pruning -----------------------------------------------------


def test_entries_and_prune_respect_in_use_and_age(
    cache: ImageCache, image_dir: Path, tmp_path: Path
) -> None:
    images = [factory.raw(image_dir / f"{i}.raw", size=MiB, seed=i) for i in range(3)]
    old, used, fresh = (cache.get(source(p.as_uri(), p), disk_size=None) for p in images)
    for entry in (old, used):
        os.utime(entry.path, (1000, 1000))
    stale_partial = cache.tmp_dir / f"sha256-{'0' * 64}.part"
    stale_partial.write_bytes(b"half")
    os.utime(stale_partial, (1000, 1000))

    listed = {e.id: e for e in cache.index.entries(in_use={used.id})}
    assert set(listed) == {old.id, used.id, fresh.id}
    assert listed[used.id].in_use and not listed[old.id].in_use
    assert listed[old.id].last_used == 1000
    assert listed[fresh.id].source_url == images[2].as_uri()
    assert listed[old.id].format == "raw" and listed[old.id].virtual_size == MiB
    assert 0 < listed[old.id].size <= MiB

    removed = cache.index.prune(max_age=3600, in_use={used.id})
    assert [e.id for e in removed] == [old.id]
    assert cache.lookup(old.id) is None and not old.path.exists()
    assert cache.lookup(used.id) == used and cache.lookup(fresh.id) == fresh
    assert not stale_partial.exists()
    assert cache.index.prune(max_age=0, in_use={used.id, fresh.id}) == []


def test_qemu_img_agrees_with_cached_entry(cache: ImageCache, image_dir: Path) -> None:
    img = factory.qcow2(image_dir / "a.qcow2", size=6 * MiB)
    got = cache.get(source(img.as_uri(), img, "qcow2"), disk_size=6 * MiB)
    info = qemu_img.info(got.path, "qcow2")
    assert (info.format, info.virtual_size, info.backing_file) == ("qcow2", 6 * MiB, None)
