"""A loopback HTTP image server for tests, with switches for misbehaviour.

Serves registered byte strings; supports ``Range``/``If-Range`` (can be
switched off), can drop the connection mid-body once, stall mid-body once,
serve wrong bytes, delay every body, and redirect a path to any URL.  It
records every request so tests can assert what the client asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

_RANGE = re.compile(r"^bytes=(\d+)-$")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Seen:
    path: str
    range: str | None
    status: int
    authorization: str | None = None


@dataclass
class Switches:
    ranges: bool = True
    drop_once_after: int | None = None  # close the socket after this many body bytes, once
    stall_once_after: int | None = None  # stop sending for stall_seconds after this many, once
    stall_seconds: float = 2.0
    wrong_bytes: bool = False  # flip the last byte of every body
    delay: float = 0.0  # seconds to wait before each body (makes callers overlap)
    drip: float | None = None  # send the body one byte per this many seconds
    endless: bool = False  # an endless body with no Content-Length (random bytes)


@dataclass
class ImageServer:
    """``with ImageServer() as server: server.add("/a.img", data); server.url("/a.img")``."""

    switches: Switches = field(default_factory=Switches)
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    host: str = "127.0.0.1"  # any 127/8 address works on Linux: a second "host" for SSRF tests

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _Server((self.host, 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()  # wake stalled handlers
        self._httpd.shutdown()
        self._httpd.server_close()  # joins handler threads
        self._thread.join()

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def gets(self, path: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path == path]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _take(self, name: str) -> int | None:
        """Read a once-only switch and disarm it."""
        with self._lock:
            value: int | None = getattr(self.switches, name)
            setattr(self.switches, name, None)
            return value


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for handlers: no stray sockets
    owner: ImageServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body is what half the tests do


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        sw = owner.switches
        range_header = self.headers.get("Range")
        auth = self.headers.get("Authorization")
        self.close_connection = True
        if self.path in owner.redirects:
            owner._record(Seen(self.path, range_header, 302, auth))
            self._head(302, {"Location": owner.redirects[self.path], "Content-Length": "0"})
            return
        if sw.endless:
            owner._record(Seen(self.path, range_header, 200, auth))
            self._head(200, {})
            self._endless()
            return
        data = owner.files.get(self.path)
        if data is None:
            owner._record(Seen(self.path, range_header, 404))
            self._head(404, {"Content-Length": "0"})
            return
        if sw.wrong_bytes:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start, status = 0, 200
        match = _RANGE.match(range_header or "")
        if sw.ranges and match and self.headers.get("If-Range", etag) == etag:
            start = int(match.group(1))
            if start >= len(data):
                owner._record(Seen(self.path, range_header, 416))
                self._head(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
                return
            status = 206
        owner._record(Seen(self.path, range_header, status, auth))
        headers = {"Content-Length": str(len(data) - start), "ETag": etag}
        if sw.ranges:
            headers["Accept-Ranges"] = "bytes"
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._head(status, headers)
        if sw.delay:
            owner._stop.wait(sw.delay)
        self._body(data[start:])

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**headers, "Connection": "close"}.items():
            self.send_header(key, value)
        self.end_headers()

    def _body(self, body: bytes) -> None:
        owner = self.server.owner
        drop = owner._take("drop_once_after")
        stall = owner._take("stall_once_after")
        sent = 0
        if owner.switches.drip is not None:
            while sent < len(body) and not owner._stop.wait(owner.switches.drip):
                self.wfile.write(body[sent : sent + 1])
                self.wfile.flush()
                sent += 1
            return
        while sent < len(body):
            if drop is not None and sent >= drop:
                self.wfile.flush()
                return  # Connection: close; the client sees a short body
            if stall is not None and sent >= stall:
                stall = None
                if owner._stop.wait(owner.switches.stall_seconds):
                    return
            chunk = body[sent : sent + _CHUNK]
            self.wfile.write(chunk)
            sent += len(chunk)

    def _endless(self) -> None:
        chunk = os.urandom(_CHUNK)
        while not self.server.owner._stop.is_set():
            try:
                self.wfile.write(chunk)
            except OSError:
                return  # the client gave up, as it should
