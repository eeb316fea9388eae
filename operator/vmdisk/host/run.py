"""The one door through which vmdisk starts host processes.

Argument lists only (no shell), ``LC_ALL=C``, a timeout on every call, and
optional resource limits for commands that parse untrusted images: a
crafted image can make ``qemu-img info`` eat memory and CPU (Nova's
CVE-2015-5162), so such calls run under ``prlimit``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import PermanentError, TemporaryError, VMDiskError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Resource limits for a command that reads untrusted data."""

    address_space: int = 1024**3
    cpu_seconds: int = 30

    def prefix(self) -> list[str]:
        return [
            _which("prlimit"),
            f"--as={self.address_space}",
            f"--cpu={self.cpu_seconds}",
            "--",
        ]


UNTRUSTED = Limits()


class CommandError(VMDiskError):
    """A host command failed; carries argv, exit code and stderr."""

    reason = "CommandFailed"

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-3:] if stderr.strip() else []
        super().__init__(
            f"{os.path.basename(argv[0])} exited with {returncode}"
            + (": " + " / ".join(tail) if tail else "")
        )


class MissingTool(PermanentError):
    reason = "MissingTool"


class CommandTimeout(TemporaryError):
    reason = "CommandTimeout"

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        super().__init__(f"{os.path.basename(argv[0])} did not finish within {timeout:.0f}s")


@dataclass(frozen=True)
class Result:
    argv: list[str]
    stdout: str
    stderr: str


def _which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise MissingTool(f"required host command {name!r} is not installed")
    return path


Progress = Callable[[float], None]
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def run(
    argv: Sequence[str],
    *,
    timeout: float = 600.0,
    limits: Limits | None = None,
    input_data: str | None = None,
    env: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Result:
    """Run a command and return its output, or raise CommandError / CommandTimeout.

    With ``progress``, the command's ``(NN.NN/100%)`` progress lines (qemu-img
    ``-p``) are passed on as they arrive.
    """
    full = [_which(argv[0]), *argv[1:]]
    if limits is not None:
        full = [*limits.prefix(), *full]
    environment = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    if env:
        environment.update(env)
    log.debug("run: %s", " ".join(full))
    if progress is not None:
        return _run_with_progress(full, timeout, environment, progress)
    # No input: stdin is /dev/null, never the agent's own (a terminal in local
    # mode), so a command that prompts fails at once instead of waiting for
    # an answer nobody sees (lvm2's "Proceed? [y/n]").
    stdin = {"input": input_data} if input_data is not None else {"stdin": subprocess.DEVNULL}
    try:
        proc = subprocess.run(
            full,
            **stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(full, timeout) from exc
    if proc.returncode != 0:
        raise CommandError(full, proc.returncode, proc.stdout, proc.stderr)
    return Result(full, proc.stdout, proc.stderr)


def _run_with_progress(
    argv: list[str], timeout: float, env: Mapping[str, str], progress: Progress
) -> Result:
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()

    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
    timer = threading.Timer(timeout, expire)
    reader.start()
    timer.start()
    out = bytearray()
    try:
        # Progress arrives as \r-separated updates on stdout; pass it on as it comes.
        while chunk := os.read(stdout.fileno(), 4096):
            out += chunk
            matches = _PERCENT.findall(chunk)
            if matches:
                progress(float(matches[-1]))
        proc.wait()
    finally:
        timer.cancel()
        reader.join()
        stdout.close()
        stderr.close()
    if expired.is_set():
        raise CommandTimeout(argv, timeout)
    text = b"".join(errors).decode(errors="replace")
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, out.decode(errors="replace"), text)
    return Result(argv, out.decode(errors="replace"), text)
