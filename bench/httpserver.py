"""A loopback file server for the download figures: threaded, Range-capable, counting.

It runs in its own process (``python -m bench.httpserver DIR``) so that
serving bytes never competes with the measured client for the GIL.  It
serves the files of one directory with ``sendfile``, honours
``Range: bytes=N-`` / ``bytes=N-M`` and ``If-Range``, and counts requests per
path; ``GET /_stats`` returns the counts as JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Counts:
    """Requests for one path: all GETs, and those that sent the whole file."""

    gets: int
    full: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    lock: threading.Lock
    gets: Counter[str]
    full: Counter[str]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/_stats":
            with self.server.lock:
                body = json.dumps(
                    {p: [n, self.server.full[p]] for p, n in self.server.gets.items()}
                ).encode()
            self._head(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
            self.wfile.write(body)
            return
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = self.server.root / self.path.lstrip("/")
        if "/" in self.path.lstrip("/") or not path.is_file():
            self._head(404, {"Content-Length": "0"})
            return
        stat = path.stat()
        size, etag = stat.st_size, f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        start, end, status = 0, size - 1, 200
        match = _RANGE.match(self.headers.get("Range", ""))
        if match and self.headers.get("If-Range", etag) == etag:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size or start > end:
                self._head(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                return
            status = 206
        if body:
            with self.server.lock:
                self.server.gets[self.path] += 1
                if start == 0 and end == size - 1:
                    self.server.full[self.path] += 1
        headers = {
            "Content-Length": str(end - start + 1),
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Content-Type": "application/octet-stream",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._head(status, headers)
        if body:
            self.wfile.flush()
            with open(path, "rb") as handle:
                self.connection.sendfile(handle, start, end - start + 1)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()


def serve(root: Path) -> None:
    """Serve ``root`` on a free loopback port; print ``PORT <n>`` once listening."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.lock = root, threading.Lock()
    httpd.gets, httpd.full = Counter(), Counter()
    print(f"PORT {httpd.server_address[1]}", flush=True)
    httpd.serve_forever()


class FileServer:
    """``with FileServer(dir) as server: server.url("a.img"); server.counts("a.img")``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> FileServer:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.httpserver", str(self.root)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,  # where the bench package lives
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self._stop()
            raise RuntimeError(f"bench.httpserver did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def counts(self, name: str) -> Counts:
        """How often ``name`` was fetched so far."""
        with urllib.request.urlopen(self.url("_stats"), timeout=10) as resp:
            data: dict[str, list[int]] = json.load(resp)
        gets, full = data.get(f"/{name}", [0, 0])
        return Counts(gets, full)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
