"""The host door: processes with limits and timeouts, locks, atomic writes, sparse copies."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import loop_mounted_ext4
from vmdisk.errors import InsufficientSpace
from vmdisk.host import qemu_img
from vmdisk.host.files import (
    allocated_bytes,
    atomic_write,
    read_copy,
    remove_on_error,
    sparse_copy,
    write_copy,
)
from vmdisk.host.headers import HeaderMismatch, parallels_virtual_size, qcow2_virtual_size
from vmdisk.host.locks import LockTimeout, file_lock
from vmdisk.host.run import CommandError, CommandTimeout, Limits, run

MiB = 1024 * 1024


def test_errors_carry_argv_exit_code_and_stderr():
    with pytest.raises(CommandError) as err:
        run(["qemu-img", "info", "-f", "qcow2", "/nonexistent"])
    assert err.value.returncode == 1
    assert "/nonexistent" in err.value.stderr
    assert err.value.argv[-1] == "/nonexistent"
    assert "qemu-img exited with 1" in err.value.message


def test_timeout_is_enforced():
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        run(["sleep", "5"], timeout=0.3)
    assert time.monotonic() - started < 3


def test_untrusted_commands_run_under_resource_limits():
    limits = Limits(address_space=64 * MiB, cpu_seconds=1)
    out = run(["sh", "-c", "ulimit -v; ulimit -t"], limits=limits).stdout.split()
    assert out == [str(64 * 1024), "1"]
    # A process that wants more memory than allowed is stopped, not the host.
    with pytest.raises(CommandError):
        run(["python3", "-c", "b = bytearray(256 * 1024 * 1024)"], limits=limits)


def test_convert_reports_progress(tmp_path: Path):
    source = tmp_path / "src.raw"
    with open(source, "wb") as handle:
        handle.write(os.urandom(32 * MiB))
    seen: list[float] = []
    qemu_img.convert(source, "raw", tmp_path / "dst.qcow2", "qcow2", progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == 100.0
    assert qemu_img.info(tmp_path / "dst.qcow2", "qcow2").virtual_size == 32 * MiB


def _hold_lock(path: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    with file_lock(Path(path)):
        ready.set()
        time.sleep(1.5)


def test_lock_excludes_other_processes(tmp_path: Path):
    lock = tmp_path / "locks" / "x.lock"
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(str(lock), ready))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockTimeout), file_lock(lock, timeout=0.2):
            pass
        started = time.monotonic()
        with file_lock(lock, timeout=10):
            assert time.monotonic() - started > 0.5  # waited for the holder
    finally:
        holder.join()


def test_lock_dies_with_its_process(tmp_path: Path):
    lock = tmp_path / "x.lock"
    code = (
        "import os; from pathlib import Path; from vmdisk.host.locks import file_lock\n"
        f"with file_lock(Path({str(lock)!r})): os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    with file_lock(lock, timeout=0.5):
        pass


def test_atomic_write_never_shows_half(tmp_path: Path):
    target = tmp_path / "d" / "rec.json"
    atomic_write(target, "old")
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["rec.json"]


def test_remove_on_error_removes_half_made(tmp_path: Path):
    half = tmp_path / "half"
    with pytest.raises(RuntimeError), remove_on_error(half):
        half.mkdir()
        (half / "x").write_text("partial")
        raise RuntimeError("boom")
    assert not half.exists()


def test_sparse_copy_keeps_holes_and_bytes(tmp_path: Path):
    source = tmp_path / "src"
    with open(source, "wb") as handle:
        handle.truncate(64 * MiB)
        handle.seek(10 * MiB)
        handle.write(b"x" * MiB)
        handle.seek(63 * MiB)
        handle.write(b"tail")
    method = sparse_copy(source, tmp_path / "dst")
    assert method in ("reflink", "sparse")
    assert (tmp_path / "dst").read_bytes() == source.read_bytes()
    assert allocated_bytes(tmp_path / "dst") < 4 * MiB


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with loop_mounted_ext4(tmp_path, 16) as mount:
        yield mount


def test_full_filesystem_is_a_typed_retryable_error(tiny_fs: Path, tmp_path: Path):
    source = tmp_path / "big"
    source.write_bytes(os.urandom(32 * MiB))
    with pytest.raises(InsufficientSpace) as err:
        sparse_copy(source, tiny_fs / "copy")
    assert not err.value.permanent


@pytest.mark.parametrize("fmt", ["qcow2", "parallels"])
@pytest.mark.parametrize("size", [MiB, 64 * MiB + 512, 3 * 1024 * MiB])
def test_header_sizes_agree_with_qemu_img(tmp_path: Path, fmt: str, size: int):
    path = tmp_path / f"img.{fmt}"
    qemu_img.create(path, fmt, size)
    read = qcow2_virtual_size if fmt == "qcow2" else parallels_virtual_size
    assert read(path) == qemu_img.info(path, fmt).virtual_size


def test_header_readers_refuse_other_formats(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.write_bytes(b"\0" * 4096)
    for read in (qcow2_virtual_size, parallels_virtual_size):
        with pytest.raises(HeaderMismatch):
            read(raw)


def test_a_file_copy_keeps_bytes_and_holes_and_refuses_to_overwrite(tmp_path: Path):
    source = tmp_path / "source"
    with open(source, "wb") as handle:
        handle.write(b"head" * 1024)
        handle.seek(1024 * 1024)
        handle.write(b"tail" * 1024)
        handle.truncate(4 * 1024 * 1024)
    assert read_copy(source, limit=4096) is None  # 8 KiB of data is over the limit
    copy = read_copy(source, limit=64 * 1024)
    assert copy is not None and copy.size == 4 * 1024 * 1024
    target = tmp_path / "target"
    write_copy(target, copy)
    assert target.read_bytes() == source.read_bytes()
    assert allocated_bytes(target) == allocated_bytes(source) < 64 * 1024
    with pytest.raises(FileExistsError):
        write_copy(target, copy)
