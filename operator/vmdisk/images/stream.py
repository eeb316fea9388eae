"""Stages between a fetch and the files it fills, each on its own thread.

A fetch hands large blocks of received bytes to a ``Tee``, which gives
every block, in order, to each of its stages: the running sha256, the
sparse writer of the partial file, a decompressor writing the image.
Each stage runs on its own thread behind a small bounded queue, so
receiving, hashing, decompressing and writing overlap (hashlib, the
decompressors and ``pwrite`` release the GIL on large buffers), while a
slow stage still holds the receiver back instead of piling up memory.
"""

from __future__ import annotations

import hashlib
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

Block = tuple[bytes, ...]
"""The chunks of one block as they were received: the stages never join them (one copy less)."""


class Stage(Protocol):
    """Consumes the blocks of one fetch in order; runs on its own thread."""

    def consume(self, blocks: Iterator[Block]) -> None: ...


def chunks(blocks: Iterator[Block]) -> Iterator[bytes]:
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
    it to materialise a trailing hole.
    """

    def __init__(
        self, fd: int, offset: int = 0, *, present: int = 0, writeback: bool = True
    ) -> None:
        self.fd = fd
        self.end = offset
        self.present = present  # bytes fed that the file already holds (a resumed partial)
        # Start writing each block to disk at once: for a file that will be
        # fsynced; a scratch file that is deleted soon is better left in memory.
        self.writeback = writeback

    def consume(self, blocks: Iterator[Block]) -> None:
        for block in blocks:
            self.write(block)

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
        try:
            size = write_sparse(self.fd, block, self.end)
        except OSError as exc:
            raise_if_no_space(exc)  # on the writer's thread, typed like every other write
            raise
        if size and self.writeback:
            start_writeback(self.fd, self.end, size)  # the final fsync then has little to do
        self.end += size


def write_sparse(fd: int, block: Block, offset: int) -> int:
    """Write ``block`` at ``offset``, one ``pwritev`` per run of data, zero pieces left as holes.

    Pieces end at multiples of SPARSE_BLOCK in the file; a piece split
    between two chunks is judged part by part (a skipped zero part still
    reads as zeros).  Returns the bytes the block covers.
    """
    run: list[memoryview] = []  # consecutive data not yet written, starting at run_at
    run_at = at = offset
    for chunk in block:
        start, size = 0, len(chunk)
        piece_from = -1  # where the data in this chunk that extends the run begins
        while start < size:
            edge = min(size, start + SPARSE_BLOCK - (at + start) % SPARSE_BLOCK)
            # bytes.startswith compares in place (a memoryview compares item by item).
            if chunk.startswith(_ZEROES[: edge - start], start):
                if piece_from >= 0:
                    run.append(memoryview(chunk)[piece_from:start])
                    piece_from = -1
                if run:
                    _pwritev_all(fd, run, run_at)
                    run = []
            elif piece_from < 0:
                if not run:
                    run_at = at + start
                piece_from = start
            start = edge
        if piece_from >= 0:
            run.append(memoryview(chunk)[piece_from:])
        at += size
    if run:
        _pwritev_all(fd, run, run_at)
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


class _Worker:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.queue: queue.Queue[Block] = queue.Queue(_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vmdisk-stage", daemon=True)

    def _blocks(self) -> Iterator[Block]:
        while True:
            block = self.queue.get()
            if not block:
                return
            yield block

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

    def put(self, block: Block, waiting: Callable[[], object] | None = None) -> None:
        """Queue ``block`` for every stage; ``waiting`` is called each second a queue is full.

        ``waiting`` may raise (the fetch's deadline) to give up on a stage
        that stopped keeping up; the Tee is then to be closed, not fed.
        """
        if not block:
            return
        self._raise_failed()
        for worker in self._workers:
            while True:
                try:
                    worker.queue.put(block, timeout=1.0)
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
                worker.queue.put(_END)
            for worker in self._workers:
                worker.thread.join()
        self._raise_failed()

    def _raise_failed(self) -> None:
        for worker in self._workers:
            if worker.error is not None:
                raise worker.error
