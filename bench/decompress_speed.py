"""(z) Decompressing downloads: a 1 GiB raw image as .xz and .zst vs ``curl | xz -d > file``.

The image holds 384 MiB of data with about 4 bits of entropy per byte
(compressible, as disk contents are) in 16 MiB runs, and holes between
them.  ``ImageCache.get`` fetches it, verifies the sha256 of the
compressed bytes, decompresses in the same pass, checks the image and
fsyncs it into place; the baselines only pipe curl into the decompressor
(Debian's ``xz``/``zstd``, multi-threaded where they can be) and write
the file.  Runs are interleaved; the cells show median, slowest and
fastest in decompressed MB/s, CPU seconds and the load average.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

from vmdisk.api.vmdisk import ImageSource
from vmdisk.config import Settings
from vmdisk.images.cache import ImageCache

from .download_speed import LOOPBACK, interleaved
from .harness import GiB, MiB, Row, sh, sha256_file
from .httpserver import FileServer

RUNS = 5
TARGET = 0.9
DATA_RUN = 16 * MiB
COMPRESS = {"xz": ["xz", "-T0", "-1", "-c"], "zstd": ["zstd", "-T0", "-3", "-q", "-c"]}
DECOMPRESS = {"xz": "xz -d", "zstd": "zstd -d -q"}
SUFFIX = {"xz": ".xz", "zstd": ".zst"}


def compressible_image(path: Path, size: int, data: int) -> None:
    """``size`` bytes: ``data`` of them 16-symbol noise in DATA_RUN runs, holes between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = bytes((b & 0x0F) + 0x30 for b in range(256))
    runs = data // DATA_RUN
    stride = (size - MiB) // runs
    with open(path, "wb") as out:
        out.truncate(size)
        for i in range(runs):
            out.seek(MiB + i * stride)
            out.write(os.urandom(DATA_RUN).translate(table))


def run(scratch: Path) -> list[Row]:
    served = scratch / "served"
    raw = served / "image1g.raw"
    compressible_image(raw, GiB, 384 * MiB)
    rows = []
    for kind in ("xz", "zstd"):
        packed = served / f"image1g{SUFFIX[kind]}"
        with open(raw, "rb") as src, open(packed, "wb") as out:
            subprocess.run(COMPRESS[kind], stdin=src, stdout=out, check=True, timeout=1800)
        rows.append(_figure(scratch, kind, packed))
        packed.unlink()
    return rows


def _figure(scratch: Path, kind: str, packed: Path) -> Row:
    sha = sha256_file(packed)
    with FileServer(packed.parent) as server:
        url = server.url(packed.name)
        source = ImageSource(url=url, checksum=f"sha256:{sha}", format="raw")

        def engine(i: int) -> Path:
            cache = ImageCache(
                scratch / f"cache-{kind}{i}",
                policy=LOOPBACK,
                max_virtual_size=Settings().max_virtual_size,
            )
            return cache.get(source, disk_size=GiB).path

        def pipe(i: int) -> Path:
            target = scratch / f"pipe-{kind}{i}.raw"
            sh(
                "bash",
                "-o",
                "pipefail",
                "-c",
                f'curl -s "$0" | {DECOMPRESS[kind]} > "$1"',
                url,
                target,
            )
            return target

        clients: dict[str, Callable[[int], Path]] = {"engine": engine, "pipe": pipe}
        got = interleaved(clients, GiB, RUNS)
    ours, theirs = (statistics.median(got.rates[k]) for k in clients)
    return Row(
        f"(z) decompressing download, 1 GiB raw as {packed.suffix} "
        f"({packed.stat().st_size // MiB} MiB), sha256 of the fetched bytes verified in the "
        f"same pass (ImageCache.get, checks and fsync included); load {got.load} on 2 shared cores",
        got.cell("engine"),
        f"curl | {DECOMPRESS[kind]} > file: {got.cell('pipe')}",
        f"{ours / theirs:.2f}x",
        f"≥ {TARGET}x",
        ours >= TARGET * theirs,
    )
