"""Stages between a fetch and the files it fills, each on its own thread.

A fetch hands large blocks of received bytes to a ``Tee``, which gives
every block, in order, to each of its stages: the running sha256, the
sparse writer of the partial file, a decompressor writing the image.
Each stage runs on its own thread behind a small bounded queue, so
receiving, hashing, decompressing and writing overlap (hashlib, the
decompressors and ``pwrite`` release the GIL on large buffers), while a
slow stage still holds the receiver back instead of piling up memory.

A file that will be fsynced is written with O_DIRECT where the filesystem
allows it: the bytes go from an aligned staging buffer to the device
without a copy into the page cache and without writeback work afterwards,
which leaves the CPU to the receiver and the hash (profiled on 1 GiB: the
page-cache copy and its writeback took about 0.4 s of 2.2 s CPU, while the
hash, the critical path, needs 0.9 s of a core to itself).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ..host.files import raise_if_no_space, start_writeback

BLOCK = 8 * 1024 * 1024  # about this many bytes per block handed to the stages
SPARSE_BLOCK = 64 * 1024  # all-zero pieces of this size, aligned in the file, become holes
_ZEROES = bytes(SPARSE_BLOCK)
_DEPTH = 3  # blocks queued per stage: memory stays under a few dozen MiB per fetch
_END: Block = ()  # no stage is ever handed an empty block, so it marks the end
_IOV_MAX = 1024  # the most buffers one pwritev takes (Linux)
# O_DIRECT wants buffer address, file offset and length aligned to the logical
# block size; 4 KiB covers both 512-byte and 4 KiB sector devices.
ALIGN = 4096
_STAGE = BLOCK  # the staging buffer of a direct writer: one pwrite of this size each

Chunk = bytes | memoryview
Block = tuple[Chunk, ...]
"""The chunks of one block as they were received: the stages never join them (one copy less).

A memoryview chunk lives in a ``BufferRing`` slot: a stage must be done
with it when it asks for the next block (the slot is then filled again).
"""


class Stage(Protocol):
    """Consumes the blocks of one fetch in order; runs on its own thread."""

    def consume(self, blocks: Iterator[Block]) -> None: ...


def chunks(blocks: Iterator[Block]) -> Iterator[Chunk]:
    """The chunks of ``blocks`` one by one, for stages that need no block boundaries."""
    for block in blocks:
        yield from block


class Hashing:
    """The sha256 of every byte fed."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()

    def consume(self, blocks: Iterator[Block]) -> None:
        update = self.hasher.update  # releases the GIL for each chunk (all over 2 KiB but the last)
        for chunk in chunks(blocks):
            update(chunk)

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


class SparseFile:
    """Writes consecutive bytes to ``fd`` from ``offset`` on, all-zero pieces as holes.

    The file must hold zeros (holes) past ``offset``: a new file, or one
    truncated there; the first ``present`` bytes fed are already in it.
    ``end`` is where the next byte goes; the caller truncates the file to
    it to materialise a trailing hole, after ``consume`` has returned.
    """

    def __init__(
        self, fd: int, offset: int = 0, *, present: int = 0, writeback: bool = True
    ) -> None:
        self.fd = fd
        self.end = offset
        self.present = present  # bytes fed that the file already holds (a resumed partial)
        # A file that will be fsynced goes to the device as it is written (the
        # final fsync then has little to do); a scratch file deleted soon is
        # better left in memory.
        self.writeback = writeback
        self._direct: _DirectWriter | None = None

    def consume(self, blocks: Iterator[Block]) -> None:
        if self.writeback:
            self._direct = _DirectWriter.open(self.fd)
        try:
            for block in blocks:
                self.write(block)
            if self._direct is not None:
                self._guarded(self._direct.flush)
        finally:
            if self._direct is not None:
                self._direct.close()
                self._direct = None

    def write(self, block: Block) -> None:
        if self.present:
            kept = []
            for chunk in block:
                skip = min(self.present, len(chunk))
                self.present -= skip
                self.end += skip
                if skip < len(chunk):
                    kept.append(chunk[skip:])
            block = tuple(kept)
        direct = self._direct
        if direct is not None:
            size = self._guarded(lambda: write_sparse(self.fd, block, self.end, direct.write))
        else:
            size = self._guarded(lambda: write_sparse(self.fd, block, self.end))
            if size and self.writeback:
                start_writeback(self.fd, self.end, size)  # no O_DIRECT here: start it at once
        self.end += size

    @staticmethod
    def _guarded(write: Callable[[], int | None]) -> int:
        try:
            return write() or 0
        except OSError as exc:
            raise_if_no_space(exc)  # on the writer's thread, typed like every other write
            raise


class _DirectWriter:
    """Runs of data written through an O_DIRECT descriptor, staged in an aligned buffer.

    Each staged stretch starts at an aligned file offset; bytes before the
    first aligned offset of a run, and the unaligned end of a stretch, go
    through the ordinary descriptor (the kernel keeps the two coherent).
    """

    def __init__(self, fd: int, direct: int) -> None:
        self.fd = fd
        self.direct: int | None = direct
        self.buffer = mmap.mmap(-1, _STAGE)  # page aligned, reused for the whole file
        self.view = memoryview(self.buffer)
        self.at = 0  # the file offset of staged byte 0 (aligned)
        self.held = 0

    @classmethod
    def open(cls, fd: int) -> _DirectWriter | None:
        """A second, O_DIRECT descriptor of the same open file; None where unsupported."""
        try:
            # The magic link names the open file itself: no path is resolved again.
            direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except (OSError, AttributeError):  # no O_DIRECT on this filesystem, or no /proc
            return None
        return cls(fd, direct)

    def write(self, run: list[memoryview], at: int) -> None:
        """Write ``run``, consecutive bytes starting at file offset ``at``."""
        if self.held and self.at + self.held != at:
            self.flush()
        for piece in run:
            if not self.held and not at % ALIGN and len(piece) >= ALIGN:
                done = self._straight(piece[: len(piece) - len(piece) % ALIGN], at)
                piece, at = piece[done:], at + done
                if not piece:
                    continue
            if not self.held:
                head = min(-at % ALIGN, len(piece))
                if head:
                    _pwritev_all(self.fd, [piece[:head]], at)
                    piece, at = piece[head:], at + head
                self.at = at
            while piece:
                take = min(len(piece), _STAGE - self.held)
                self.view[self.held : self.held + take] = piece[:take]
                self.held += take
                piece, at = piece[take:], at + take
                if self.held == _STAGE:
                    self._write_staged(_STAGE)

    def _straight(self, data: memoryview, at: int) -> int:
        """Write aligned ``data`` from where it is, if its memory is aligned too (a ring slot)."""
        if self.direct is None:
            return 0
        try:
            return os.pwrite(self.direct, data, at)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # memory not aligned (bytes): stage it instead
                return 0
            raise

    def flush(self) -> None:
        """Write everything staged: the aligned part directly, the rest buffered."""
        aligned = self.held - self.held % ALIGN
        if aligned:
            self._write_staged(aligned)
        if self.held:
            _pwritev_all(self.fd, [self.view[: self.held]], self.at)
            self.at += self.held
            self.held = 0

    def _write_staged(self, size: int) -> None:
        data = self.view[:size]
        done = 0
        if self.direct is not None:
            try:
                done = os.pwrite(self.direct, data, self.at)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: alignment refused; go buffered
                    raise
                self._stop_direct()
        if done < size:  # short or refused: the rest through the page cache
            _pwritev_all(self.fd, [data[done:]], self.at + done)
            start_writeback(self.fd, self.at + done, size - done)
        rest = self.held - size
        if rest:
            self.view[:rest] = self.view[size : self.held]
        self.at += size
        self.held = rest

    def _stop_direct(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None

    def close(self) -> None:
        self._stop_direct()
        self.view.release()
        self.buffer.close()


def write_sparse(
    fd: int,
    block: Block,
    offset: int,
    sink: Callable[[list[memoryview], int], None] | None = None,
) -> int:
    """Write ``block`` at ``offset``, one ``pwritev`` per run of data, zero pieces left as holes.

    Pieces end at multiples of SPARSE_BLOCK in the file; a piece split
    between two chunks is judged part by part (a skipped zero part still
    reads as zeros).  ``sink(run, at)``, if given, writes each run instead.
    Returns the bytes the block covers.
    """
    write = sink or (lambda run, at: _pwritev_all(fd, run, at))
    run: list[memoryview] = []  # consecutive data not yet written, starting at run_at
    run_at = at = offset
    for chunk in block:
        view = memoryview(chunk)
        start, size = 0, len(view)
        piece_from = -1  # where the data in this chunk that extends the run begins
        while start < size:
            edge = min(size, start + SPARSE_BLOCK - (at + start) % SPARSE_BLOCK)
            # bytes.startswith compares with memcmp (memoryview == compares item by item).
            if _ZEROES.startswith(view[start:edge]):
                if piece_from >= 0:
                    run.append(view[piece_from:start])
                    piece_from = -1
                if run:
                    write(run, run_at)
                    run = []
            elif piece_from < 0:
                if not run:
                    run_at = at + start
                piece_from = start
            start = edge
        if piece_from >= 0:
            run.append(view[piece_from:])
        at += size
    if run:
        write(run, run_at)
    return at - offset


def _pwritev_all(fd: int, run: list[memoryview], offset: int) -> None:
    for first in range(0, len(run), _IOV_MAX):
        buffers = run[first : first + _IOV_MAX]
        total = sum(len(b) for b in buffers)
        written = os.pwritev(fd, buffers, offset)
        if written < total:  # short write (rare): finish the rest one buffer at a time
            _pwrite_rest(fd, buffers, offset, written)
        offset += total


def _pwrite_rest(fd: int, buffers: list[memoryview], offset: int, written: int) -> None:
    for buffer in buffers:
        if written >= len(buffer):
            written -= len(buffer)
            offset += len(buffer)
            continue
        data, offset, written = buffer[written:], offset + written, 0
        while data:
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done


class BufferRing:
    """A few page-aligned receive buffers, reused: no allocation or page fault per read.

    ``take`` waits for a free slot; a slot handed to a Tee with
    ``done=ring.give`` comes back when every stage is done with it.  Being
    aligned, a slot can go to an O_DIRECT write without a copy.
    """

    def __init__(self, slots: int = _DEPTH + 2, size: int = BLOCK) -> None:
        self._memory = mmap.mmap(-1, slots * size)
        whole = memoryview(self._memory)
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(whole[i * size : (i + 1) * size])

    def take(self, waiting: Callable[[], object] | None = None) -> memoryview:
        """A free slot; ``waiting`` is called each second none is (it may raise)."""
        while True:
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                if waiting is not None:
                    waiting()

    def give(self, slot: memoryview) -> None:
        self._free.put(slot)


class _Countdown:
    """Calls ``done`` once every stage has let go of one block."""

    def __init__(self, stages: int, done: Callable[[], object]) -> None:
        self.left = stages
        self.done = done
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.done()


class _Worker:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.queue: queue.Queue[tuple[Block, _Countdown | None]] = queue.Queue(_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vmdisk-stage", daemon=True)

    def _blocks(self) -> Iterator[Block]:
        while True:
            block, countdown = self.queue.get()
            if not block:
                return
            yield block
            if countdown is not None:  # the stage asked for the next block: done with this one
                countdown.release()

    def _run(self) -> None:
        blocks = self._blocks()
        try:
            self.stage.consume(blocks)
            for _ in blocks:  # a stage that stops early still lets the feeder go on
                pass
        except BaseException as exc:  # handed to the feeding thread
            self.error = exc
            for _ in blocks:
                pass


class Tee:
    """Feeds each block to every stage in order; ``close`` waits for them all.

    A stage's error is raised (as the stage raised it) by the next ``put``
    or by ``close``; the other stages still see every block fed so far.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self._workers = [_Worker(stage) for stage in stages]
        self._closed = False
        for worker in self._workers:
            worker.thread.start()

    def put(
        self,
        block: Block,
        waiting: Callable[[], object] | None = None,
        done: Callable[[], object] | None = None,
    ) -> None:
        """Queue ``block`` for every stage; ``waiting`` is called each second a queue is full.

        ``waiting`` may raise (the fetch's deadline) to give up on a stage
        that stopped keeping up; the Tee is then to be closed, not fed.
        ``done`` is called once every stage is done with the block.
        """
        if not block:
            if done is not None:
                done()
            return
        self._raise_failed()
        countdown = None
        if done is not None:
            if not self._workers:
                done()
            countdown = _Countdown(len(self._workers), done)
        for worker in self._workers:
            while True:
                try:
                    worker.queue.put((block, countdown), timeout=1.0)
                    break
                except queue.Full:
                    self._raise_failed()
                    if waiting is not None:
                        waiting()

    def close(self) -> None:
        """Let every stage finish what it was given; raise the first stage error."""
        if not self._closed:
            self._closed = True
            for worker in self._workers:
                worker.queue.put((_END, None))
            for worker in self._workers:
                worker.thread.join()
        self._raise_failed()

    def _raise_failed(self) -> None:
        for worker in self._workers:
            if worker.error is not None:
                raise worker.error
