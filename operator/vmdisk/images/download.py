"""Fetching image bytes into a partial file, hashing them on the way.

HTTP downloads stream into ``<tmp>/<key>.part`` while sha256 is computed, so
the normal path reads the bytes once.  Interrupted transfers (dropped
connection, stalled server, crashed agent) resume with a Range request when
the server honours it; a partial left by an earlier process is hashed once
before continuing.  A sidecar ``<key>.part.json`` remembers the URL and the
server's validator (ETag / Last-Modified) so a resume never splices two
versions of a file together (``If-Range``).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, ProtocolError

from ..errors import ChecksumMismatch, DownloadFailed, ImageTooLarge, SourceNotAllowed
from ..host.files import atomic_write, raise_if_no_space, sparse_copy_fd
from .decompress import MAGIC_BYTES, Decompressing, detect
from .fetchbounds import Digest, FetchLimits, HttpOptions, Progress, over_fetch_limit
from .source import check_redirect, redact
from .stream import BLOCK, Block, BufferRing, Hashing, SparseFile, Stage, Tee

log = logging.getLogger("vmdisk.images")

READ_SIZE = 1024 * 1024  # the most one read1 returns: what the socket holds, often less
FIRST_BLOCK = 1024 * 1024  # the first block of a received body
_MAX_REDIRECTS = 5
BACKOFF_BASE = 0.25
BACKOFF_MAX = 8.0
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class FetchClock:
    """The overall deadline and the minimum rate of one fetch."""

    def __init__(self, name: str, limits: FetchLimits) -> None:
        self.name = name
        self.limits = limits
        self.deadline = time.monotonic() + limits.deadline
        self.mark = (time.monotonic(), 0)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DownloadFailed(
                f"image {self.name}: not complete within the {self.limits.deadline:.0f} s "
                "deadline (VMDISK_FETCH_DEADLINE); the partial download is kept for a resume"
            )
        return left

    def timeout(self) -> float:
        return max(0.001, min(self.limits.timeout, self.remaining()))

    def restart_window(self, done: int) -> None:
        self.mark = (time.monotonic(), done)

    def tick(self, done: int) -> None:
        """Called after each read: enforce the deadline and the rate."""
        self.remaining()
        now = time.monotonic()
        since, at = self.mark
        if now - since < self.limits.rate_window:
            return
        rate = (done - at) / (now - since)
        if rate < self.limits.min_rate:
            raise DownloadFailed(
                f"image {self.name}: {rate:.0f} bytes/s over the last {now - since:.0f} s, "
                f"under the minimum of {self.limits.min_rate} bytes/s (VMDISK_FETCH_MIN_RATE)"
            )
        self.mark = (now, done)


class _Retry(Exception):
    """One attempt failed in a way worth retrying."""


class ProgressReporter:
    """Throttles progress: callback every ~1%, log line every 10% or 5 s."""

    def __init__(
        self, name: str, callback: Progress | None, decoded: Callable[[], str] | None = None
    ) -> None:
        self.name = name
        self.callback = callback
        self.decoded = decoded  # what decompression has produced so far, for the log
        self.last_call: tuple[int, int, float] = (-1, -1, 0.0)  # (bytes, percent, time)
        self.last_log: tuple[int, int, float] = (-1, -1, time.monotonic())

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        now = time.monotonic()
        pct = done * 100 // total if total else -1
        sent, sent_pct, sent_at = self.last_call
        due = final or pct != sent_pct or now - sent_at >= 1.0
        if self.callback is not None and done != sent and due:
            self.callback(done, total)
            self.last_call = (done, pct, now)
        logged, logged_pct, logged_at = self.last_log
        if done != logged and (final or pct // 10 != logged_pct // 10 or now - logged_at >= 5.0):
            shown = f"{pct}%" if total else "?%"
            extra = self.decoded() if self.decoded is not None else ""
            log.info("image %s: %d/%s bytes (%s)%s", self.name, done, total or "?", shown, extra)
            self.last_log = (done, pct, now)


class _Partial:
    """The partial file of fetched bytes, the stages fed with them, the server's validator.

    Every byte fetched goes, in order, to the sha256, to the partial file
    (kept for a resume) and, when the first bytes are a compressed
    stream and ``output`` is given, to a decompressor writing ``output``.
    A resumed partial is fed through the hash and the decompressor again
    (it is already in the file): decompressor state cannot be saved, so a
    new process decompresses from the start of the kept compressed bytes
    (local reads, no network), while retries within one fetch continue
    the live decompressor at the compressed offset.
    """

    def __init__(self, path: Path, *, output: Path | None, limit: int, name: str) -> None:
        self.path = path
        self.meta = path.with_name(path.name + ".json")
        self.output = output
        self.limit = limit  # decompressed bytes allowed
        self.name = name
        self.size = 0  # bytes fed to the stages
        self.validator: str | None = None
        self.resumed = False  # some bytes came from an earlier response
        self._hashing = Hashing()
        self._tee: Tee | None = None
        self._fds: list[int] = []
        self.decoding: Decompressing | None = None

    def restart(self, url: str, validator: str | None) -> None:
        self._stop()
        with suppress(FileNotFoundError):
            self.path.unlink()  # a planted symlink goes, its target stays untouched
        os.close(os.open(self.path, _CREATE, 0o600))
        self._hashing = Hashing()
        self.size = 0
        self.validator = validator
        self.resumed = False
        meta = {"url_sha256": _url_digest(url), "validator": validator}  # no credentials kept
        atomic_write(self.meta, json.dumps(meta), mode=0o600)

    def adopt(self, url: str, *, trust_content: bool, limit: int) -> None:
        """Take over a partial left by an earlier attempt, feeding its bytes to the stages once.

        Without a checksum a partial is reused only when it came from the same
        URL with a validator, so ``If-Range`` guards against a changed file.
        One over ``limit`` bytes (or anything but a regular file) is not read.
        """
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            self.restart(url, None)
            return
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            log.warning("image %s: unusable partial %s replaced", redact(url), self.path)
            self.restart(url, None)
            return
        try:
            fd = os.open(self.meta, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                meta = json.loads(handle.read(64 * 1024))
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        validator = meta.get("validator")
        self.validator = validator if isinstance(validator, str) else None
        if not trust_content and (meta.get("url_sha256") != _url_digest(url) or not self.validator):
            self.restart(url, None)
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb", buffering=0) as handle:
            if info.st_size:
                self._begin(os.pread(fd, MAGIC_BYTES, 0), present=info.st_size)
            while chunk := handle.read(BLOCK):
                self.feed((chunk,))
        if self.size:
            self.resumed = True
            log.info("image %s: resuming after %d bytes", redact(url), self.size)

    def feed(
        self,
        block: Block,
        waiting: Callable[[], object] | None = None,
        done: Callable[[], object] | None = None,
    ) -> None:
        """Hand ``block`` (the bytes after the first ``size``) to the stages.

        ``done`` is called when every stage is done with it (a ring slot's return).
        """
        if self._tee is None:
            head = b""
            for chunk in block if self.size == 0 else ():
                head += chunk[: MAGIC_BYTES - len(head)]
            self._begin(head, present=0)
        assert self._tee is not None
        self._tee.put(block, waiting, done)
        self.size += sum(len(chunk) for chunk in block)

    def _begin(self, head: bytes, *, present: int) -> None:
        """Start the stages: hash, partial file and, for a compressed head, decompression."""
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._fds.append(fd)
        kind = detect(head) if self.output is not None else None
        # Compressed bytes are kept only for a resume and deleted once decompressed.
        partial = SparseFile(fd, self.size, present=present, writeback=kind is None)
        stages: list[Stage] = [self._hashing, partial]
        if kind is not None and self.output is not None:
            with suppress(FileNotFoundError):
                self.output.unlink()
            out = os.open(self.output, _CREATE, 0o600)
            self._fds.append(out)
            self.decoding = Decompressing(kind, SparseFile(out), limit=self.limit, name=self.name)
            stages.append(self.decoding)
            log.info("image %s is %s-compressed; decompressing while fetching", self.name, kind)
        self._tee = Tee(stages)

    def finish(self) -> Digest:
        """Wait for the stages, raising the first stage error; the digest of all bytes fed."""
        tee, self._tee = self._tee, None
        try:
            if tee is not None:
                tee.close()
        finally:
            self._truncate_and_close()
        decoding, self.decoding = self.decoding, None
        if decoding is None:
            return Digest(self._hashing.hexdigest(), self.size)
        return Digest(self._hashing.hexdigest(), self.size, decoding.kind, decoding.decoded)

    def decoded(self) -> str:
        """Decompression progress for the log (empty for plain bytes)."""
        decoding = self.decoding
        return f", {decoding.decoded} bytes after {decoding.kind}" if decoding else ""

    def _stop(self) -> None:
        """Stop the stages after what they were given, ignoring their errors (being undone)."""
        with suppress(Exception):
            self.finish()

    def _truncate_and_close(self) -> None:
        fds, self._fds = self._fds, []
        ends = [self.size, self.decoding.out.end if self.decoding else 0]
        for fd, end in zip(fds, ends, strict=False):
            try:
                os.ftruncate(fd, end)  # materialise a trailing hole
            finally:
                os.close(fd)

    def close(self) -> None:
        """Leave the partial file consistent (for a resume) after a failure."""
        self._stop()

    def remove(self) -> None:
        self._stop()
        for path in (self.path, self.meta, self.output):
            with suppress(FileNotFoundError):
                if path is not None:
                    path.unlink()


def fetch_http(
    url: str,
    part: Path,
    *,
    expected: str | None,
    options: HttpOptions,
    progress: Progress | None,
    output: Path | None = None,
) -> Digest:
    """Download ``url`` into ``part`` and return its sha256; resume what is there.

    With ``output``, a gzip/xz/zstd/bzip2 stream (told by its first bytes)
    is decompressed into ``output`` while it arrives (``Digest.compression``
    says which); the sha256 is always that of the fetched bytes.
    Raises ChecksumMismatch (partial removed), ImageTooLarge past
    ``options.max_bytes``, DecompressedTooLarge or DecompressionFailed,
    DownloadFailed after bounded retries, the deadline or too slow a
    transfer (partial kept for a later resume), SourceNotAllowed when the
    policy refuses the URL or a redirect hop.
    """
    name = redact(url)
    partial = _Partial(part, output=output, limit=options.max_bytes, name=name)
    try:
        partial.adopt(url, trust_content=expected is not None, limit=options.max_bytes)
        clock = FetchClock(name, options.limits)
        for _ in range(2):
            digest = _download(
                url, partial, options, clock, ProgressReporter(name, progress, partial.decoded)
            )
            if expected is None or digest.sha256 == expected or not partial.resumed:
                break
            # The resumed bytes may belong to another version of the file:
            # one clean download decides before calling it a mismatch.
            log.warning("image %s: checksum mismatch after resume, downloading again", name)
            partial.restart(url, None)
    finally:
        partial.close()
    if expected is not None and digest.sha256 != expected:
        partial.remove()
        raise ChecksumMismatch(
            f"image {name} has sha256:{digest.sha256}, expected sha256:{expected}"
        )
    if digest.compression is not None:
        log.info(
            "image %s: %d bytes decompressed (%s) from %d fetched",
            name,
            digest.decoded_size,
            digest.compression,
            digest.size,
        )
    return digest


def _download(
    url: str, partial: _Partial, options: HttpOptions, clock: FetchClock, report: ProgressReporter
) -> Digest:
    failures = 0
    while True:
        try:
            _attempt(url, partial, options, clock, report)
            return partial.finish()
        except (_Retry, HTTPError, ConnectionError, TimeoutError) as exc:
            failures += 1
            if failures > options.limits.retries:
                raise DownloadFailed(
                    f"downloading {redact(url)} failed after {failures} attempts "
                    f"({partial.size} bytes kept for resume): {exc}"
                ) from exc
            delay = min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX, clock.remaining())
            log.warning("image %s: %s; retrying in %.1fs", report.name, exc, delay)
            time.sleep(delay)


def _attempt(
    url: str, partial: _Partial, options: HttpOptions, clock: FetchClock, report: ProgressReporter
) -> None:
    headers = {"Accept-Encoding": "identity"}
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
        if partial.validator:
            headers["If-Range"] = partial.validator
    resp, pool = open_checked(url, headers, options, clock)
    try:
        total, has_body = _start(resp, url, partial)
        if total is not None and total > options.max_bytes:
            raise over_fetch_limit(f"image {report.name} is {total} bytes, over", options.max_bytes)
        report(partial.size, total)
        clock.restart_window(partial.size)
        if has_body:
            _receive(resp, partial, options.max_bytes, clock, report, total)
        if total is not None and partial.size != total:
            raise _Retry(f"connection closed after {partial.size} of {total} bytes")
        report(partial.size, total or partial.size, final=True)
    except OSError as exc:
        if not isinstance(exc, ConnectionError | TimeoutError):
            raise_if_no_space(exc)
        raise
    finally:
        resp.release_conn()
        resp.close()
        pool.close()


def _receive(
    resp: urllib3.BaseHTTPResponse,
    partial: _Partial,
    max_bytes: int,
    clock: FetchClock,
    report: ProgressReporter,
    total: int | None,
) -> None:
    """Hand the body to the stages in large blocks; every read is checked against the bounds."""
    readinto = body_readinto(resp)
    if readinto is not None:
        _receive_into(readinto, partial, max_bytes, clock, report, total)
        return
    pending: list[bytes] = []
    held = 0
    try:
        # read1: whatever arrived, so a dripping server meets the rate check.
        while chunk := resp.read1(READ_SIZE, decode_content=False):
            if partial.size + held + len(chunk) > max_bytes:
                raise over_fetch_limit(f"image {report.name} sent more than", max_bytes)
            pending.append(chunk)
            held += len(chunk)
            if held >= BLOCK:
                partial.feed(tuple(pending), clock.remaining)
                pending.clear()
                held = 0
            report(partial.size + held, total)
            clock.tick(partial.size + held)
    finally:
        if pending:
            partial.feed(tuple(pending), clock.remaining)  # what arrived is kept for a resume


def _receive_into(
    readinto: Callable[[memoryview], int],
    partial: _Partial,
    max_bytes: int,
    clock: FetchClock,
    report: ProgressReporter,
    total: int | None,
) -> None:
    """``_receive`` straight into reused aligned buffers, each handed whole to the stages."""
    ring = BufferRing()
    slot = ring.take(clock.remaining)
    held = 0
    # The first block is short so hashing starts early; an aligned size keeps
    # every later block aligned in the file (written straight from its slot).
    fill = FIRST_BLOCK
    try:
        # One read at a time, whatever arrived, so a dripping server meets the rate check.
        while count := readinto(slot[held:fill]):
            if partial.size + held + count > max_bytes:
                raise over_fetch_limit(f"image {report.name} sent more than", max_bytes)
            held += count
            if held == fill:
                partial.feed((slot[:held],), clock.remaining, _giver(ring, slot))
                slot, held, fill = ring.take(clock.remaining), 0, len(slot)
            report(partial.size + held, total)
            clock.tick(partial.size + held)
    finally:
        if held:  # what arrived is kept for a resume
            partial.feed((slot[:held],), clock.remaining, _giver(ring, slot))


def _giver(ring: BufferRing, slot: memoryview) -> Callable[[], None]:
    return lambda: ring.give(slot)


def body_readinto(resp: urllib3.BaseHTTPResponse) -> Callable[[memoryview], int] | None:
    """One-read-at-a-time ``readinto`` for a plain Content-Length body, else None.

    urllib3 offers ``read1`` (a new bytes object per read) and a
    ``readinto`` that copies from it; receiving into reused buffers needs
    the buffered socket reader underneath, which http.client keeps as
    ``fp``.  Anything else (chunked, no length, bytes already buffered by
    urllib3, another response class) reads through ``read1``.
    """
    inner = getattr(resp, "_fp", None)
    if not isinstance(inner, http.client.HTTPResponse) or inner.chunked:
        return None
    reader = getattr(inner, "fp", None)
    length = inner.length
    if length is None or not isinstance(reader, io.BufferedReader):
        return None
    if getattr(resp, "_has_decoded_content", True) or len(getattr(resp, "_decoded_buffer", ())):
        return None
    left = [length]

    def readinto(view: memoryview) -> int:
        want = min(len(view), left[0])
        if not want:
            return 0
        try:
            count = reader.readinto1(view[:want])
        except (ConnectionError, TimeoutError):
            raise  # retried, like urllib3's own errors
        except (OSError, http.client.HTTPException) as exc:  # a TLS error, say
            raise ProtocolError(f"connection broken: {exc!r}") from exc
        left[0] -= count
        inner.length = left[0]  # http.client's own count stays right
        return count

    return readinto


def _start(resp: urllib3.BaseHTTPResponse, url: str, partial: _Partial) -> tuple[int | None, bool]:
    """Check the status and set the partial up; return (final size, body follows)."""
    content_range = resp.headers.get("Content-Range", "")
    if resp.status == 206 and partial.size and content_range.startswith(f"bytes {partial.size}-"):
        total = content_range.rpartition("/")[2]
        partial.resumed = True
        return (int(total) if total.isdigit() else None), True
    if resp.status == 416 and partial.size and content_range == f"bytes */{partial.size}":
        return partial.size, False  # an earlier attempt already had every byte
    if resp.status in (200, 206):
        # A full body (no range support, or If-Range says the file changed)
        # or a range that does not continue ours: start from zero.
        if partial.size:
            log.info("image %s: server sent the whole file, restarting", redact(url))
        partial.restart(url, resp.headers.get("ETag") or resp.headers.get("Last-Modified"))
        if resp.status == 206:
            raise _Retry("server answered a range that does not continue the partial file")
        length = resp.headers.get("Content-Length", "")
        return (int(length) if length.isdigit() else None), True
    if resp.status == 416:
        partial.restart(url, None)
        raise _Retry("server refused the resume range")
    if resp.status in RETRY_STATUS:
        raise _Retry(f"HTTP {resp.status}")
    raise DownloadFailed(f"GET {redact(url)} returned HTTP {resp.status} {resp.reason or ''}")


def open_checked(
    url: str, headers: dict[str, str], options: HttpOptions, clock: FetchClock
) -> tuple[urllib3.BaseHTTPResponse, urllib3.HTTPConnectionPool]:
    """GET ``url``, checking it and every redirect hop against the policy."""
    origin = _origin(url)
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        # Credentials in the URL go to its own origin only, never to a redirect target.
        own = _origin(current) == origin
        auth = {**_basic_auth(url), **dict(options.origin_headers)} if own else {}
        resp, pool = _get(current, {**headers, **auth}, options, clock)
        if resp.status not in _REDIRECT_STATUS:
            return resp, pool
        location = resp.headers.get("Location", "")
        resp.drain_conn()
        resp.release_conn()
        resp.close()
        pool.close()
        target = urljoin(current, location)
        check_redirect(current, target)
        current = target
    raise DownloadFailed(f"{redact(url)} redirected more than {_MAX_REDIRECTS} times")


def _get(
    url: str, headers: dict[str, str], options: HttpOptions, clock: FetchClock
) -> tuple[urllib3.BaseHTTPResponse, urllib3.HTTPConnectionPool]:
    """One request to the address the policy approved for ``url``'s host (no second lookup)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or any(c in url for c in "\0\r\n\t "):
        raise SourceNotAllowed(f"image URL {redact(url)!r} has no host or a control character")
    https = parts.scheme.lower() == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError as exc:
        raise SourceNotAllowed(f"image URL {redact(url)!r}: {exc}") from None
    address = options.hops.address(host, port, hop=redact(url))
    timeout = clock.timeout()
    pool: urllib3.HTTPConnectionPool
    if https:
        pool = urllib3.HTTPSConnectionPool(
            address, port, server_hostname=host, assert_hostname=host, retries=False
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, port, retries=False)
    shown = f"[{host}]" if ":" in host else host
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        resp = pool.urlopen(
            "GET",
            target,
            headers={**headers, "Host": shown if parts.port is None else f"{shown}:{port}"},
            redirect=False,
            preload_content=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )
    except BaseException:
        pool.close()
        raise
    return resp, pool


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _basic_auth(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    if parts.username is None:
        return {}
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def copy_file(
    source: int,
    name: str,
    part: Path,
    *,
    expected: str | None,
    max_bytes: int,
    limits: FetchLimits,
    progress: Progress | None,
    output: Path | None = None,
) -> Digest:
    """Copy an opened local image (descriptor ``source``) into ``part`` and hash the copy.

    The descriptor was opened without following symlinks and is checked
    here (a regular file, at most ``max_bytes``) before any byte is read.
    The copy, not the source, is hashed: the bytes that get verified are
    the bytes that enter the cache, even if the source changes meanwhile.
    With ``output``, a compressed file is instead read once, hashed and
    decompressed into ``output`` from the same buffers (nothing of it is
    copied to ``part``).
    """
    info = os.fstat(source)
    if not stat.S_ISREG(info.st_mode):
        raise SourceNotAllowed(f"image file {name} is not a regular file")
    if info.st_size > max_bytes:
        raise ImageTooLarge(
            f"image file {name} is {info.st_size} bytes, over the {max_bytes} bytes this "
            "disk may read (its size plus a margin for image metadata)"
        )
    clock = FetchClock(name, limits)
    kind = detect(os.pread(source, MAGIC_BYTES, 0)) if output is not None else None
    if kind is not None and output is not None:
        digest = _decompress_file(source, kind, name, output, max_bytes, clock, progress)
    else:
        digest = _copy_and_hash(source, info.st_size, name, part, clock, progress)
    if expected is not None and digest.sha256 != expected:
        for path in (part, output):
            with suppress(FileNotFoundError):
                if path is not None:
                    path.unlink()
        raise ChecksumMismatch(
            f"image {name} has sha256:{digest.sha256}, expected sha256:{expected}"
        )
    return digest


def _copy_and_hash(
    source: int, size: int, name: str, part: Path, clock: FetchClock, progress: Progress | None
) -> Digest:
    with suppress(FileNotFoundError):
        part.unlink()
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+b", buffering=0) as out:
        method = sparse_copy_fd(source, out.fileno(), size)
        size = os.fstat(out.fileno()).st_size
        report = ProgressReporter(name, progress)
        report(0, size)
        hashing = Hashing()
        # Reading the next block overlaps hashing this one.
        done = _feed(out.fileno(), size, Tee([hashing]), report, clock)
    report(done, size, final=True)
    log.debug("image %s copied (%s), %d bytes", name, method, size)
    return Digest(hashing.hexdigest(), size)


def _decompress_file(
    source: int,
    kind: str,
    name: str,
    output: Path,
    max_bytes: int,
    clock: FetchClock,
    progress: Progress | None,
) -> Digest:
    size = os.fstat(source).st_size
    with suppress(FileNotFoundError):
        output.unlink()
    out = os.open(output, _CREATE, 0o600)
    try:
        hashing = Hashing()
        decoding = Decompressing(kind, SparseFile(out), limit=max_bytes, name=name)
        report = ProgressReporter(
            name, progress, lambda: f", {decoding.decoded} bytes after {kind}"
        )
        log.info("image %s is %s-compressed; decompressing while copying", name, kind)
        done = _feed(source, size, Tee([hashing, decoding]), report, clock)
        os.ftruncate(out, decoding.out.end)
    except BaseException:
        with suppress(FileNotFoundError):
            output.unlink()
        raise
    finally:
        os.close(out)
    report(done, size, final=True)
    log.info(
        "image %s: %d bytes decompressed (%s) from %d read", name, decoding.decoded, kind, done
    )
    return Digest(hashing.hexdigest(), done, kind, decoding.decoded)


def _feed(fd: int, size: int, tee: Tee, report: ProgressReporter, clock: FetchClock) -> int:
    """Feed the first ``size`` bytes of ``fd`` through ``tee`` in the clock's bounds."""
    done = 0
    try:
        while done < size and (chunk := os.pread(fd, min(BLOCK, size - done), done)):
            tee.put((chunk,), clock.remaining)
            done += len(chunk)
            report(done, size)
            clock.remaining()
    finally:
        tee.close()
    return done


def _url_digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass(frozen=True)
class Reply:
    """A small response read whole (a registry's manifest or token)."""

    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


def get_small(url: str, headers: dict[str, str], options: HttpOptions, *, limit: int) -> Reply:
    """GET ``url`` like a download (every hop checked, bounded time) and read up to ``limit`` bytes.

    Connection errors and 408/429/5xx are retried like a download's attempts;
    any other status is returned to the caller.  A longer body raises ImageTooLarge.
    """
    name = redact(url)
    clock = FetchClock(name, options.limits)
    failures = 0
    while True:
        try:
            resp, pool = open_checked(
                url, {**headers, "Accept-Encoding": "identity"}, options, clock
            )
            try:
                if resp.status in RETRY_STATUS:
                    raise _Retry(f"HTTP {resp.status}")
                body = bytearray()
                while chunk := resp.read1(READ_SIZE, decode_content=False):
                    body += chunk
                    if len(body) > limit:
                        raise ImageTooLarge(f"{name} sent more than the {limit} bytes allowed")
                    clock.tick(len(body))
                found = {k.lower(): v for k, v in resp.headers.items()}
                return Reply(resp.status, found, bytes(body))
            finally:
                resp.release_conn()
                resp.close()
                pool.close()
        except (_Retry, HTTPError, ConnectionError, TimeoutError) as exc:
            failures += 1
            if failures > options.limits.retries:
                raise DownloadFailed(f"GET {name} failed after {failures} attempts: {exc}") from exc
            time.sleep(min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX, clock.remaining()))
