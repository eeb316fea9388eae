"""A registry blob read as a stream: hashed, bounded, resumed after a dropped connection.

A containerDisk layer is unpacked while it arrives (``containerdisk``), so
its bytes are written once, as the disk file, and never as a blob.  The GET
is the download module's own (every redirect hop checked against the policy,
the deadline, the minimum rate, progress), and the layer digest is computed
on the same pass and checked at the end, before the disk file may be used.

A dropped connection continues with a Range request from the compressed
offset, within one pull: the decompressor and the tar reader keep their
state in memory.  After an agent restart the pull starts again from the
first byte, since that state is not on disk (the partial disk file is
removed then, see ``extract_disk``).
"""

from __future__ import annotations

import hashlib
import logging
import time

import urllib3
from urllib3.exceptions import HTTPError

from ..errors import ChecksumMismatch, DownloadFailed, ImageTooLarge
from .download import (  # the one set of fetch bounds and hop checks
    BACKOFF_BASE,
    BACKOFF_MAX,
    READ_SIZE,
    RETRY_STATUS,
    FetchClock,
    ProgressReporter,
    open_checked,
)
from .fetchbounds import HttpOptions, Progress
from .source import redact

log = logging.getLogger("vmdisk.images")


class BlobStream:
    """``read`` gives the blob's bytes in order; ``finish`` checks its size and digest."""

    def __init__(
        self, url: str, *, digest: str, size: int, options: HttpOptions, progress: Progress | None
    ) -> None:
        self.url, self.name = url, redact(url)
        self.expected = digest  # sha256:<hex>
        self.size = size
        self.options = options
        self.clock = FetchClock(self.name, options.limits)
        self.report = ProgressReporter(self.name, progress)
        self.hasher = hashlib.sha256()
        self.done = 0
        self.failures = 0
        self.resp: urllib3.BaseHTTPResponse | None = None
        self.pool: urllib3.HTTPConnectionPool | None = None

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (at least one unless the blob is complete)."""
        want = self.size - self.done if size < 0 else min(size, self.size - self.done)
        while want > 0:
            try:
                if self.resp is None:
                    self._connect()
                    continue  # connected, or a retry status slept on
                data = self.resp.read1(min(want, READ_SIZE), decode_content=False)
            except (HTTPError, ConnectionError, TimeoutError) as exc:
                self._dropped(str(exc))
                continue
            if not data:
                self._dropped(f"connection closed after {self.done} of {self.size} bytes")
                continue
            self.hasher.update(data)
            self.done += len(data)
            self.clock.tick(self.done)
            self.report(self.done, self.size)
            return data
        return b""

    def finish(self) -> None:
        """Read what the unpacker left (tar padding), then verify size and digest."""
        while self.read(READ_SIZE):
            pass
        if self.resp is not None and self.resp.read1(1, decode_content=False):
            raise ImageTooLarge(f"blob {self.name} is longer than its manifest's {self.size} bytes")
        self.close()
        found = "sha256:" + self.hasher.hexdigest()
        if found != self.expected:
            raise ChecksumMismatch(f"blob {self.name} has digest {found}, expected {self.expected}")
        self.report(self.done, self.size, final=True)

    def close(self) -> None:
        if self.resp is not None:
            self.resp.release_conn()
            self.resp.close()
        if self.pool is not None:
            self.pool.close()
        self.resp = self.pool = None

    def _connect(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
        resp, pool = open_checked(self.url, headers, self.options, self.clock)
        self.resp, self.pool = resp, pool
        if resp.status == 206 and resp.headers.get("Content-Range", "").startswith(
            f"bytes {self.done}-"
        ):
            return
        if resp.status == 200:
            self._skip(self.done)  # no range support: read past what we already have
            return
        status = resp.status
        self.close()
        if status in RETRY_STATUS:
            self._dropped(f"HTTP {status}")
            return
        raise DownloadFailed(f"GET {self.name} returned HTTP {status}")

    def _skip(self, count: int) -> None:
        assert self.resp is not None
        while count > 0:
            data = self.resp.read1(min(count, READ_SIZE), decode_content=False)
            if not data:
                raise DownloadFailed(f"GET {self.name}: the body ended before byte {self.done}")
            count -= len(data)
            self.clock.tick(self.done)

    def _dropped(self, why: str) -> None:
        self.close()
        self.failures += 1
        if self.failures > self.options.limits.retries:
            raise DownloadFailed(
                f"downloading {self.name} failed after {self.failures} attempts: {why}"
            )
        delay = min(BACKOFF_BASE * 2 ** (self.failures - 1), BACKOFF_MAX, self.clock.remaining())
        log.warning(
            "image %s: %s; continuing from byte %d in %.1fs", self.name, why, self.done, delay
        )
        time.sleep(delay)
