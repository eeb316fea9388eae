"""Decompressing fetched bytes while they stream: gzip, xz, zstd and bzip2.

The format is told by the first bytes (magic numbers), never by the file
name.  ``Decompressing`` is a stage of ``stream.Tee``: it pulls compressed
blocks in order and writes the decompressed bytes to a ``SparseFile``, at
most ``limit`` of them (a decompression bomb stops there with
DecompressedTooLarge), each output piece bounded so memory stays flat.
Concatenated members/streams/frames are decompressed one after another
(as ``gzip -d``, ``xz -d``, ``zstd -d`` and ``bzip2 -d`` do); zero padding
after the last one is ignored, anything else after it is refused.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Iterator

import zstandard

from ..errors import DecompressedTooLarge, DecompressionFailed
from .stream import BLOCK, Block, SparseFile, Tee, chunks

# Longest magic first is not needed: no magic is a prefix of another.
_MAGIC = {
    "gzip": b"\x1f\x8b\x08",  # ID1 ID2 and CM=deflate, the only method there is
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
    "bzip2": b"BZh",
}
MAGIC_BYTES = 16  # enough of the head to tell every format
COMPRESSIONS = frozenset(_MAGIC)
_OUT = 4 * 1024 * 1024  # the most output one decompressor call may return
_XZ_MEMLIMIT = 256 * 1024 * 1024  # xz -9 needs ~65 MiB; a hostile header asks for more
_ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default limit (128 MiB): --long=31 frames refused


def detect(head: bytes) -> str | None:
    """The compression ``head`` (the first bytes of a file) starts with, or None."""
    for kind, magic in _MAGIC.items():
        if head.startswith(magic):
            if kind == "bzip2" and not (len(head) > 3 and head[3:4] in b"123456789"):
                continue  # "BZh" and a block size digit
            return kind
    return None


class Decompressing:
    """A Tee stage: decompress the blocks of a ``kind`` stream into ``out``."""

    def __init__(self, kind: str, out: SparseFile, *, limit: int, name: str) -> None:
        self.kind = kind
        self.out = out
        self.limit = limit
        self.name = name
        self.decoded = 0  # read by the feeding thread for progress

    def consume(self, blocks: Iterator[Block]) -> None:
        # Writing on a thread of its own: decompressing and writing overlap.
        sink = Tee([self.out])
        pieces: list[bytes] = []  # gathered into blocks: fewer, larger writes
        held = 0
        try:
            # A decoder may keep a slice of its input past the next block, so
            # ring slots (memoryviews, reused) are copied first.
            data = (bytes(c) if isinstance(c, memoryview) else c for c in chunks(blocks))
            for piece in _decode(self.kind, data):
                if self.decoded + len(piece) > self.limit:
                    raise DecompressedTooLarge(
                        f"image {self.name} ({self.kind}) decompresses to more than the "
                        f"{self.limit} bytes this disk may hold (its size plus a margin "
                        "for image metadata); refusing it"
                    )
                pieces.append(piece)
                held += len(piece)
                self.decoded += len(piece)
                if held >= BLOCK:
                    sink.put(tuple(pieces))
                    pieces, held = [], 0
            sink.put(tuple(pieces))
        except _Corrupt as exc:
            raise DecompressionFailed(
                f"image {self.name} is not a valid {self.kind} stream after "
                f"{self.decoded} decompressed bytes: {exc}"
            ) from None
        finally:
            sink.close()  # the output is complete (or abandoned) when consume returns


class _Corrupt(Exception):
    pass


def _decode(kind: str, blocks: Iterator[bytes]) -> Iterator[bytes]:
    if kind == "zstd":
        return _zstd(blocks)
    return _members(kind, blocks)


class _Member:
    """One gzip member, xz stream or bzip2 stream, behind one interface."""

    def __init__(self, kind: str) -> None:
        self._zlib: zlib._Decompress | None = None
        self._other: lzma.LZMADecompressor | bz2.BZ2Decompressor | None = None
        if kind == "gzip":
            self._zlib = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header, CRC
        elif kind == "xz":
            self._other = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
        else:
            self._other = bz2.BZ2Decompressor()
        self._tail = b""  # zlib's unconsumed input
        self.needs_input = True

    def step(self, data: bytes) -> bytes:
        try:
            if self._zlib is not None:
                out = self._zlib.decompress(self._tail + data if self._tail else data, _OUT)
                self._tail = self._zlib.unconsumed_tail
                self.needs_input = not self._tail and len(out) < _OUT
                return out
            assert self._other is not None
            out = self._other.decompress(data, _OUT)
            self.needs_input = self._other.needs_input
            return out
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
            raise _Corrupt(str(exc)) from None

    @property
    def eof(self) -> bool:
        codec = self._zlib if self._zlib is not None else self._other
        assert codec is not None
        return bool(codec.eof)

    @property
    def unused(self) -> bytes:
        codec = self._zlib if self._zlib is not None else self._other
        assert codec is not None
        return bytes(codec.unused_data)


def _members(kind: str, blocks: Iterator[bytes]) -> Iterator[bytes]:
    member = _Member(kind)
    while True:
        if member.eof:
            rest = _after_member(member.unused, blocks)
            if rest is None:
                return
            if not rest.startswith(_MAGIC[kind]):
                raise _Corrupt(f"{len(rest)}+ bytes of other data follow the compressed stream")
            member = _Member(kind)
            data = rest
        elif member.needs_input:
            block = next(blocks, None)
            if block is None:
                raise _Corrupt("the compressed stream ends early (truncated)")
            data = block
        else:
            data = b""
        out = member.step(data)
        if out:
            yield out


def _after_member(unused: bytes, blocks: Iterator[bytes]) -> bytes | None:
    """What follows a finished member, zero padding skipped; None at the end of input."""
    rest = unused.lstrip(b"\0")
    while not rest:
        block = next(blocks, None)
        if block is None:
            return None
        rest = block.lstrip(b"\0")
    return rest


class _Reader:
    """The blocks as a file-like ``read`` for zstandard's stream reader."""

    def __init__(self, blocks: Iterator[bytes], frames: _ZstdFrames) -> None:
        self.blocks = blocks
        self.frames = frames
        self.held = b""

    def read(self, size: int = -1) -> bytes:
        if not self.held:
            self.held = next(self.blocks, b"")
            self.frames.feed(self.held)
        if size < 0 or size >= len(self.held):
            out, self.held = self.held, b""
        else:
            out, self.held = self.held[:size], self.held[size:]
        return out


def _zstd(blocks: Iterator[bytes]) -> Iterator[bytes]:
    frames = _ZstdFrames()
    source = _Reader(blocks, frames)
    context = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    # Its stubs name IO[bytes]; it calls nothing but read().
    reader = context.stream_reader(source, read_size=BLOCK, read_across_frames=True)  # type: ignore[arg-type]
    read: Callable[[int], bytes] = reader.read
    try:
        while out := read(_OUT):
            yield out
    except zstandard.ZstdError as exc:
        raise _Corrupt(str(exc)) from None
    if not frames.complete:
        raise _Corrupt("the compressed stream ends early (truncated)")


_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


class _ZstdFrames:
    """Follows zstd frame and block headers to tell a whole stream from a cut one.

    zstandard's stream reader reports a stream cut short as a plain end;
    the headers say where each frame ends (RFC 8878, 3.1), so this walks
    them, skipping the block contents, at a few bytes of work per block.
    """

    def __init__(self) -> None:
        self.head = b""
        self.want = 4  # header bytes to collect before the next decision
        self.skip = 0  # body bytes to pass over
        self.state = "magic"
        self.checksum = False
        self.frames = 0

    @property
    def complete(self) -> bool:
        return self.frames > 0 and self.state == "magic" and not self.head and not self.skip

    def feed(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if self.skip:
                taken = min(self.skip, size - pos)
                self.skip -= taken
                pos += taken
                continue
            needed = self.want - len(self.head)
            self.head += data[pos : pos + needed]
            pos += needed
            if len(self.head) == self.want:
                self._header()

    def _header(self) -> None:
        head, self.head = self.head, b""
        if self.state == "magic":
            magic = int.from_bytes(head[:4], "little")
            if len(head) == 4 and magic in _ZSTD_SKIPPABLE:
                self.head, self.want = head, 8  # magic and a 4-byte length
                return
            if len(head) == 8:  # a skippable frame's length
                self.skip, self.want = int.from_bytes(head[4:], "little"), 4
                self.frames += 1
                return
            if len(head) == 4:
                self.head, self.want = head, 5  # magic and the frame header descriptor
                return
            descriptor = head[4]
            single = (descriptor >> 5) & 1
            content_size = (single, 2, 4, 8)[descriptor >> 6]
            self.checksum = bool((descriptor >> 2) & 1)
            self.skip = (1 - single) + (0, 1, 2, 4)[descriptor & 3] + content_size
            self.state, self.want = "block", 3
            return
        header = int.from_bytes(head, "little")
        kind, length = (header >> 1) & 3, header >> 3
        self.skip = 1 if kind == 1 else length  # an RLE block holds one byte
        if header & 1:  # the frame's last block
            self.skip += 4 if self.checksum else 0
            self.state, self.want = "magic", 4
            self.frames += 1
