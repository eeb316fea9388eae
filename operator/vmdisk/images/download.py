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

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import HTTPError

from ..errors import ChecksumMismatch, DownloadFailed, ImageTooLarge
from ..host.files import atomic_write, raise_if_no_space, sparse_copy, start_writeback
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


@dataclass(frozen=True)
class Digest:
    sha256: str
    size: int


@dataclass(frozen=True)
class HttpOptions:
    timeout: float  # connect and per-read timeout: a stalled server counts as a failure
    retries: int
    max_bytes: int  # stop an endless or oversized body early


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
        self.path.write_bytes(b"")
        self.hasher = hashlib.sha256()
        self.size = 0
        self.validator = validator
        self.resumed = False
        atomic_write(self.meta, json.dumps({"url": url, "validator": validator}), mode=0o600)

    def adopt(self, url: str, *, trust_content: bool) -> None:
        """Take over a partial left by an earlier attempt, hashing its bytes once.

        Without a checksum a partial is reused only when it came from the same
        URL with a validator, so ``If-Range`` guards against a changed file.
        """
        if not self.path.exists():
            return
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            meta = {}
        validator = meta.get("validator")
        self.validator = validator if isinstance(validator, str) else None
        if not trust_content and (meta.get("url") != url or not self.validator):
            self.restart(url, None)
            return
        with open(self.path, "rb") as handle:
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

    Raises ChecksumMismatch (partial removed), DownloadFailed after bounded
    retries (partial kept for a later resume), SourceNotAllowed on a bad
    redirect.
    """
    partial = _Partial(part)
    partial.adopt(url, trust_content=expected is not None)
    with urllib3.PoolManager(retries=False) as pool:
        for _ in range(2):
            digest = _download(pool, url, partial, options, _Reporter(redact(url), progress))
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
    pool: urllib3.PoolManager,
    url: str,
    partial: _Partial,
    options: HttpOptions,
    report: _Reporter,
) -> Digest:
    failures = 0
    while True:
        try:
            _attempt(pool, url, partial, options, report)
            return Digest(partial.hasher.hexdigest(), partial.size)
        except (_Retry, HTTPError, ConnectionError, TimeoutError) as exc:
            failures += 1
            if failures > options.retries:
                raise DownloadFailed(
                    f"downloading {redact(url)} failed after {failures} attempts "
                    f"({partial.size} bytes kept for resume): {exc}"
                ) from exc
            delay = min(_BACKOFF_BASE * 2 ** (failures - 1), _BACKOFF_MAX)
            log.warning("image %s: %s; retrying in %.1fs", report.name, exc, delay)
            time.sleep(delay)


def _attempt(
    pool: urllib3.PoolManager,
    url: str,
    partial: _Partial,
    options: HttpOptions,
    report: _Reporter,
) -> None:
    headers = {"Accept-Encoding": "identity"}
    if partial.size:
        headers["Range"] = f"bytes={partial.size}-"
        if partial.validator:
            headers["If-Range"] = partial.validator
    resp = _open(pool, url, headers, options.timeout)
    try:
        total, has_body = _start(resp, url, partial)
        if total is not None and total > options.max_bytes:
            raise ImageTooLarge(f"image {report.name} is {total} bytes, over the size limit")
        report(partial.size, total)
        if has_body:
            with open(partial.path, "r+b") as out:
                out.seek(partial.size)
                try:
                    for chunk in resp.stream(_CHUNK, decode_content=False):
                        _write_sparse(out, chunk)
                        start_writeback(out.fileno(), partial.size, len(chunk))
                        partial.append(chunk)
                        if partial.size > options.max_bytes:
                            raise ImageTooLarge(f"image {report.name} exceeds the size limit")
                        report(partial.size, total)
                finally:
                    out.truncate(partial.size)  # materialise a trailing hole
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
    pool: urllib3.PoolManager, url: str, headers: dict[str, str], timeout: float
) -> urllib3.BaseHTTPResponse:
    """GET ``url``, following only http(s) redirects, a bounded number of times."""
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        resp = pool.request(
            "GET",
            current,
            headers=headers,
            redirect=False,
            preload_content=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )
        if resp.status not in _REDIRECT_STATUS:
            return resp
        location = resp.headers.get("Location", "")
        resp.drain_conn()
        resp.release_conn()
        resp.close()
        target = urljoin(current, location)
        check_redirect(current, target)
        current = target
    raise DownloadFailed(f"{redact(url)} redirected more than {_MAX_REDIRECTS} times")


def copy_file(
    source: Path, part: Path, *, expected: str | None, progress: Progress | None
) -> Digest:
    """Copy a local image into ``part`` (sparse-aware) and hash the copy.

    The copy, not the source, is hashed: the bytes that get verified are
    the bytes that enter the cache, even if the source changes meanwhile.
    """
    with suppress(FileNotFoundError):
        part.unlink()
    method = sparse_copy(source, part)
    size = part.stat().st_size
    report = _Reporter(str(source), progress)
    report(0, size)
    hasher = hashlib.sha256()
    done = 0
    with open(part, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
            done += len(chunk)
            report(done, size)
    report(done, size, final=True)
    log.debug("image %s copied (%s), %d bytes", source, method, size)
    if expected is not None and hasher.hexdigest() != expected:
        part.unlink()
        raise ChecksumMismatch(
            f"image {source} has sha256:{hasher.hexdigest()}, expected sha256:{expected}"
        )
    return Digest(hasher.hexdigest(), size)
