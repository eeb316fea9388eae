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
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError

from ..config import Settings
from ..errors import ChecksumMismatch, DownloadFailed, ImageTooLarge, SourceNotAllowed
from ..host.files import atomic_write, raise_if_no_space, sparse_copy_fd, start_writeback
from .policy import HopCheck
from .source import check_redirect, redact

log = logging.getLogger("vmdisk.images")

Progress = Callable[[int, int | None], None]

_CHUNK = 1024 * 1024
_SPARSE_BLOCK = 64 * 1024
_ZEROES = bytes(_SPARSE_BLOCK)
_MAX_REDIRECTS = 5
_BACKOFF_BASE = 0.25
_BACKOFF_MAX = 8.0
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Digest:
    sha256: str
    size: int


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one fetch (one reconcile's worth of attempts); see Settings."""

    timeout: float = 60.0  # connect and per-read timeout
    retries: int = 5
    deadline: float = 4 * 3600.0  # every attempt of one fetch together
    min_rate: int = 64 * 1024  # bytes per second, averaged over rate_window
    rate_window: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        return cls(
            timeout=settings.fetch_timeout,
            deadline=settings.fetch_deadline,
            min_rate=settings.fetch_min_rate,
            rate_window=settings.fetch_rate_window,
        )


@dataclass(frozen=True)
class HttpOptions:
    limits: FetchLimits
    max_bytes: int  # stop an endless or oversized body early
    hops: HopCheck  # the source policy, checked at every hop
    # Sent to the first URL's origin only, never to a redirect target on another
    # host (a registry's bearer token must not reach the object store it redirects to).
    origin_headers: tuple[tuple[str, str], ...] = ()


def max_fetch_bytes(disk_size: int | None, max_virtual_size: int) -> int:
    """The most bytes a fetch may bring for a disk of ``disk_size`` (None: size from the image).

    An image's file exceeds its virtual size only by its metadata (qcow2:
    L1/L2 and refcount tables, ~1/6000 at 64 KiB clusters, more with small
    clusters or an internal snapshot), so 1/16 plus 16 MiB is generous and
    still stops an endless body within a few percent of the disk.
    """
    virtual = min(disk_size, max_virtual_size) if disk_size is not None else max_virtual_size
    return virtual + virtual // 16 + 16 * 1024 * 1024


class _Clock:
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


class _Reporter:
    """Throttles progress: callback every ~1%, log line every 10% or 5 s."""

    def __init__(self, name: str, callback: Progress | None) -> None:
        self.name = name
        self.callback = callback
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
            log.info("image %s: %d/%s bytes (%s)", self.name, done, total or "?", shown)
            self.last_log = (done, pct, now)


class _Partial:
    """The partial file, the running hash of its bytes, and the server's validator."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = path.with_name(path.name + ".json")
        self.hasher = hashlib.sha256()
        self.size = 0
        self.validator: str | None = None
        self.resumed = False  # some bytes came from an earlier response

    def restart(self, url: str, validator: str | None) -> None:
        with suppress(FileNotFoundError):
            self.path.unlink()  # a planted symlink goes, its target stays untouched
        os.close(os.open(self.path, _CREATE, 0o600))
        self.hasher = hashlib.sha256()
        self.size = 0
        self.validator = validator
        self.resumed = False
        meta = {"url_sha256": _url_digest(url), "validator": validator}  # no credentials kept
        atomic_write(self.meta, json.dumps(meta), mode=0o600)

    def adopt(self, url: str, *, trust_content: bool, limit: int) -> None:
        """Take over a partial left by an earlier attempt, hashing its bytes once.

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
        with os.fdopen(fd, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                self.hasher.update(chunk)
                self.size += len(chunk)
        if self.size:
            self.resumed = True
            log.info("image %s: resuming after %d bytes", redact(url), self.size)

    def append(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.size += len(chunk)

    def remove(self) -> None:
        for path in (self.path, self.meta):
            with suppress(FileNotFoundError):
                path.unlink()


def fetch_http(
    url: str, part: Path, *, expected: str | None, options: HttpOptions, progress: Progress | None
) -> Digest:
    """Download ``url`` into ``part`` and return its sha256; resume what is there.

    Raises ChecksumMismatch (partial removed), ImageTooLarge past
    ``options.max_bytes``, DownloadFailed after bounded retries, the deadline
    or too slow a transfer (partial kept for a later resume), SourceNotAllowed
    when the policy refuses the URL or a redirect hop.
    """
    partial = _Partial(part)
    partial.adopt(url, trust_content=expected is not None, limit=options.max_bytes)
    clock = _Clock(redact(url), options.limits)
    for _ in range(2):
        digest = _download(url, partial, options, clock, _Reporter(redact(url), progress))
        if expected is None or digest.sha256 == expected or not partial.resumed:
            break
        # The resumed bytes may belong to another version of the file:
        # one clean download decides before calling it a mismatch.
        log.warning("image %s: checksum mismatch after resume, downloading again", redact(url))
        partial.restart(url, None)
    if expected is not None and digest.sha256 != expected:
        partial.remove()
        raise ChecksumMismatch(
            f"image {redact(url)} has sha256:{digest.sha256}, expected sha256:{expected}"
        )
    return digest


def _download(
    url: str, partial: _Partial, options: HttpOptions, clock: _Clock, report: _Reporter
) -> Digest:
    failures = 0
    while True:
        try:
            _attempt(url, partial, options, clock, report)
            return Digest(partial.hasher.hexdigest(), partial.size)
        except (_Retry, HTTPError, ConnectionError, TimeoutError) as exc:
            failures += 1
            if failures > options.limits.retries:
                raise DownloadFailed(
                    f"downloading {redact(url)} failed after {failures} attempts "
                    f"({partial.size} bytes kept for resume): {exc}"
                ) from exc
            delay = min(_BACKOFF_BASE * 2 ** (failures - 1), _BACKOFF_MAX, clock.remaining())
            log.warning("image %s: %s; retrying in %.1fs", report.name, exc, delay)
            time.sleep(delay)


def _attempt(
    url: str, partial: _Partial, options: HttpOptions, clock: _Clock, report: _Reporter
) -> None:
    headers = {"Accept-Encoding": "identity"}
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
        if partial.validator:
            headers["If-Range"] = partial.validator
    resp, pool = _open(url, headers, options, clock)
    try:
        total, has_body = _start(resp, url, partial)
        if total is not None and total > options.max_bytes:
            raise ImageTooLarge(
                f"image {report.name} is {total} bytes, over the {options.max_bytes} bytes "
                "this disk may fetch (its size plus a margin for image metadata)"
            )
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
    clock: _Clock,
    report: _Reporter,
    total: int | None,
) -> None:
    """Append the body to the partial file; every read is checked against the bounds."""
    fd = os.open(partial.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "r+b") as out:
        out.seek(partial.size)
        pending = bytearray()

        def flush(upto: int) -> None:
            if upto > 0:
                chunk = bytes(pending[:upto])
                del pending[:upto]
                _write_sparse(out, chunk)
                start_writeback(out.fileno(), partial.size, len(chunk))
                partial.append(chunk)

        try:
            # read1: whatever arrived, so a dripping server meets the rate check.
            while chunk := resp.read1(_CHUNK, decode_content=False):
                if partial.size + len(pending) + len(chunk) > max_bytes:
                    raise ImageTooLarge(
                        f"image {report.name} sent more than the {max_bytes} bytes this disk "
                        "may fetch (its size plus a margin for image metadata)"
                    )
                pending += chunk
                # Write whole blocks at block-aligned offsets, so zero blocks become holes.
                flush(len(pending) - (partial.size + len(pending)) % _SPARSE_BLOCK)
                report(partial.size, total)
                clock.tick(partial.size + len(pending))
            flush(len(pending))
        except BaseException:
            flush(len(pending))  # what arrived is kept for a resume
            raise
        finally:
            out.truncate(partial.size)  # materialise a trailing hole


def _write_sparse(out: BinaryIO, chunk: bytes) -> None:
    """Write ``chunk``, leaving holes for all-zero blocks so cached images stay sparse."""
    view = memoryview(chunk)
    for start in range(0, len(view), _SPARSE_BLOCK):
        block = view[start : start + _SPARSE_BLOCK]
        if block == _ZEROES[: len(block)]:
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)


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
    if resp.status in _RETRY_STATUS:
        raise _Retry(f"HTTP {resp.status}")
    raise DownloadFailed(f"GET {redact(url)} returned HTTP {resp.status} {resp.reason or ''}")


def _open(
    url: str, headers: dict[str, str], options: HttpOptions, clock: _Clock
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
    url: str, headers: dict[str, str], options: HttpOptions, clock: _Clock
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
) -> Digest:
    """Copy an opened local image (descriptor ``source``) into ``part`` and hash the copy.

    The descriptor was opened without following symlinks and is checked
    here (a regular file, at most ``max_bytes``) before any byte is read.
    The copy, not the source, is hashed: the bytes that get verified are
    the bytes that enter the cache, even if the source changes meanwhile.
    """
    info = os.fstat(source)
    if not stat.S_ISREG(info.st_mode):
        raise SourceNotAllowed(f"image file {name} is not a regular file")
    if info.st_size > max_bytes:
        raise ImageTooLarge(
            f"image file {name} is {info.st_size} bytes, over the {max_bytes} bytes this "
            "disk may read (its size plus a margin for image metadata)"
        )
    with suppress(FileNotFoundError):
        part.unlink()
    clock = _Clock(name, limits)
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+b") as out:
        method = sparse_copy_fd(source, out.fileno(), info.st_size)
        size = os.fstat(out.fileno()).st_size
        report = _Reporter(name, progress)
        report(0, size)
        hasher = hashlib.sha256()
        done = 0
        out.seek(0)
        while chunk := out.read(_CHUNK):
            hasher.update(chunk)
            done += len(chunk)
            report(done, size)
            clock.remaining()
    report(done, size, final=True)
    log.debug("image %s copied (%s), %d bytes", name, method, size)
    if expected is not None and hasher.hexdigest() != expected:
        part.unlink()
        raise ChecksumMismatch(
            f"image {name} has sha256:{hasher.hexdigest()}, expected sha256:{expected}"
        )
    return Digest(hasher.hexdigest(), size)


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
    clock = _Clock(name, options.limits)
    failures = 0
    while True:
        try:
            resp, pool = _open(url, {**headers, "Accept-Encoding": "identity"}, options, clock)
            try:
                if resp.status in _RETRY_STATUS:
                    raise _Retry(f"HTTP {resp.status}")
                body = bytearray()
                while chunk := resp.read1(_CHUNK, decode_content=False):
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
            time.sleep(min(_BACKOFF_BASE * 2 ** (failures - 1), _BACKOFF_MAX, clock.remaining()))
