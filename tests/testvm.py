"""The test VM: device-mapper tests run inside a Debian kernel under QEMU.

This machine's kernel has no device-mapper, so LVM activation, thin pools,
snapshots, merges and dm-crypt cannot run on it.  ``scripts/testvm/build.sh``
builds (once per change of its inputs) a Debian kernel, its initrd and a
root image with lvm2, cryptsetup and qemu-utils.  This plugin boots it once
per pytest session and runs every selected test marked ``testvm`` inside it,
with the project tree and its ``.venv`` shared read-only over 9p at the same
absolute path (the VM runs the same Debian python3).  Back on the host, each
such test reports the outcome it had in the VM; a skip inside the VM is a
failure.  Where the kernel has device-mapper (a real node, or the VM itself),
the marked tests simply run where they are.

KVM is used when it boots (nested KVM may not: on this machine the guest
hangs before its first console line, and ``-cpu host`` aborts on an MSR), TCG
otherwise; the verdict is cached per host kernel and QEMU version, and the
session summary says which was used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "testvm" / "build.sh"
IN_VM = os.environ.get("VMDISK_IN_TESTVM") == "1"
MARK = "testvm"
# conftest plugins the VM's pytest loads; the others need services (libvirt,
# Ceph, an API server) that the VM does not have and its tests do not use.
VM_PLUGINS = ("lvmfixtures", "testvm")
KVM_BOOT_DEADLINE = 20.0  # seconds to the guest's first line under KVM (TCG needs ~20 s)
STARTED = "testvm: init started"


def device_mapper_available() -> bool:
    try:
        os.close(os.open("/dev/mapper/control", os.O_RDWR))
    except OSError:
        return False
    return True


# -- the image -------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    directory: Path

    @property
    def kernel_version(self) -> str:
        return (self.directory / "kernel-version").read_text().strip()


def build_image() -> Image:
    """The cached VM image (built first when its inputs changed)."""
    proc = subprocess.run([str(BUILD)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Image(Path(proc.stdout.strip().splitlines()[-1]))


# -- booting -----------------------------------------------------------------------
@dataclass(frozen=True)
class Accelerator:
    name: str  # "KVM" or "TCG"
    argv: tuple[str, ...]


KVM = Accelerator("KVM", ("-machine", "q35,accel=kvm", "-cpu", "host,-arch-capabilities"))
TCG = Accelerator("TCG", ("-machine", "q35,accel=tcg", "-cpu", "max"))


@dataclass(frozen=True)
class Run:
    accelerator: Accelerator
    returncode: int | None  # the job's exit code; None when it never finished
    console: str
    seconds: float

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def _verdict_file(image: Image) -> Path:
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(f"{platform.release()}\n{qemu}".encode()).hexdigest()[:16]
    return image.directory.parent / f"kvm-verdict-{key}"


def _candidates(image: Image) -> list[Accelerator]:
    wanted = os.environ.get("VMDISK_TESTVM_ACCEL", "").upper()
    if wanted in ("KVM", "TCG"):
        return [KVM if wanted == "KVM" else TCG]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return [TCG]
    verdict = _verdict_file(image)
    if verdict.exists() and verdict.read_text().strip() == "no":
        return [TCG]
    return [KVM, TCG]


def run(
    script: str,
    *,
    jobdir: Path,
    timeout: float,
    memory_mib: int = 1536,
    env: dict[str, str] | None = None,
) -> Run:
    """Boot the VM once and run ``script`` (sh) in it, in the project tree.

    ``jobdir`` is shared read-write at ``/testvm``; the script leaves its
    results there.  The project tree is mounted read-only at its host path.
    """
    image = build_image()
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    root = shlex.quote(str(ROOT))
    (jobdir / "run.sh").write_text(
        "set -u\n"
        "modprobe -a loop dm_mod dm_snapshot dm_thin_pool dm_crypt\n"
        f"mkdir -p {root}\n"
        "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose "
        f"project {root} || exit 97\n"
        f"cd {root}\n"
        "export HOME=/root TMPDIR=/var/tmp PYTHONDONTWRITEBYTECODE=1 VMDISK_IN_TESTVM=1\n"
        f"{exports}"
        f'export PATH="{root}/.venv/bin:$PATH"\n'
        'echo "testvm: job started at $(cut -d" " -f1 /proc/uptime) s"\n'
        f"{script}\n"
    )
    candidates = _candidates(image)
    for accelerator in candidates:
        result = _boot(image, accelerator, jobdir, timeout, memory_mib, last=accelerator is TCG)
        if accelerator is KVM:
            _verdict_file(image).write_text("yes\n" if result is not None else "no\n")
        if result is not None:
            return result
    raise AssertionError("unreachable: TCG always boots or times out")


def _boot(
    image: Image, accelerator: Accelerator, jobdir: Path, timeout: float, memory: int, last: bool
) -> Run | None:
    """One boot; None when KVM did not come up in time (the caller falls back)."""
    console = jobdir / f"console-{accelerator.name.lower()}.log"
    rc = jobdir / "rc"
    rc.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64",
        *accelerator.argv,
        "-m", str(memory), "-smp", "2",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(image.directory / "vmlinuz"),
        "-initrd", str(image.directory / "initrd.img"),
        "-append", "console=ttyS0 root=/dev/vda rw init=/sbin/vmdisk-testvm-init panic=-1 quiet",
        # snapshot=on: the cached image is never written; the VM's changes go away.
        "-drive",
        f"file={image.directory / 'root.img'},format=raw,if=virtio,snapshot=on,cache=unsafe",
        "-device", "virtio-rng-pci",
        "-virtfs", f"local,path={jobdir},mount_tag=job,security_model=none",
        "-virtfs", f"local,path={ROOT},mount_tag=project,security_model=none,readonly=on",
        "-serial", f"file:{console}",
    ]  # fmt: skip
    started = time.monotonic()
    errors = jobdir / f"qemu-{accelerator.name.lower()}.stderr"
    timed_out = False
    with errors.open("w") as stderr:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            while qemu.poll() is None:
                elapsed = time.monotonic() - started
                if not last and elapsed > KVM_BOOT_DEADLINE and STARTED not in _read(console):
                    return None
                if elapsed > timeout:
                    timed_out = True
                    break
                time.sleep(0.2)
        finally:
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()
    text = _read(console)
    if qemu.returncode != 0 and not timed_out and STARTED not in text:
        if not last:
            return None
        raise RuntimeError(f"QEMU failed ({qemu.returncode}): {_read(errors)}\n{text[-3000:]}")
    if timed_out:
        text += f"\ntestvm: killed after {timeout:.0f} s (VMDISK_TESTVM_TIMEOUT)\n"
    code = int(rc.read_text()) if rc.exists() else None
    return Run(accelerator, code, text, time.monotonic() - started)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- pytest: the host side ------------------------------------------------------------
@dataclass
class Outcome:
    outcome: str  # passed | failed | skipped | missing
    text: str = ""


@dataclass
class Session:
    """The one VM run of a pytest session: every selected testvm test."""

    nodeids: list[str]
    results: dict[str, Outcome] | None = None
    run: Run | None = None
    kernel: str = ""
    error: str | None = None

    def ensure(self, tmp: Path) -> None:
        if self.results is not None or self.error is not None:
            return
        try:
            self._run(tmp)
        except Exception as exc:  # every test of the session reports it
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self, tmp: Path) -> None:
        jobdir = Path(tempfile.mkdtemp(prefix="testvm-", dir=tmp))
        args = " ".join(shlex.quote(a) for a in _vm_pytest_args(self.nodeids))
        self.kernel = build_image().kernel_version
        self.run = run(
            f"python -m pytest {args}",
            jobdir=jobdir,
            timeout=float(os.environ.get("VMDISK_TESTVM_TIMEOUT", "900")),
            env={"VMDISK_TESTVM_REPORT": "/testvm/report.jsonl"},
        )
        self.results = _parse(jobdir / "report.jsonl")


def _vm_pytest_args(nodeids: Sequence[str]) -> list[str]:
    blocked = [p for p in _conftest_plugins() if p not in VM_PLUGINS]
    args = ["-p", "no:cacheprovider", "-q", "-rfEs", "--color=no", "--durations=0",
            "--basetemp=/var/tmp/pytest"]  # fmt: skip
    for plugin in blocked:
        args += ["-p", f"no:{plugin}"]
    return [*args, *nodeids]


def _conftest_plugins() -> list[str]:
    conftest = sys.modules.get("conftest")
    return list(getattr(conftest, "pytest_plugins", []))


def _parse(report: Path) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    if not report.exists():
        return results
    for line in report.read_text().splitlines():
        entry = json.loads(line)
        current = results.setdefault(entry["nodeid"], Outcome("passed"))
        if entry["outcome"] == "failed":
            current.outcome = "failed"
            current.text += f"[{entry['when']}] {entry['longrepr']}\n"
        elif entry["outcome"] == "skipped" and current.outcome != "failed":
            current.outcome = "skipped"
            current.text += entry["longrepr"]
    return results


class VMFailure(Exception):
    pass


class VMItem(pytest.Item):
    """Stands in on the host for a test that ran inside the VM."""

    def __init__(self, *, original: pytest.Item, session_run: Session, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = original
        self.session_run = session_run
        self.own_markers = list(original.iter_markers())

    def runtest(self) -> None:
        state = self.session_run
        state.ensure(Path(tempfile.gettempdir()))
        if state.error is not None:
            raise VMFailure(f"the test VM could not run: {state.error}")
        assert state.results is not None and state.run is not None
        outcome = state.results.get(self.original.nodeid)
        if outcome is None:
            raise VMFailure(
                f"no result from the test VM (job exit code {state.run.returncode}); "
                f"console tail:\n{state.run.tail()}"
            )
        if outcome.outcome == "failed":
            raise VMFailure(f"failed inside the test VM:\n{outcome.text}")
        if outcome.outcome == "skipped":
            raise VMFailure(f"skipped inside the test VM (a skip is a failure): {outcome.text}")

    def repr_failure(  # type: ignore[override]
        self, excinfo: pytest.ExceptionInfo[BaseException]
    ) -> str:
        if isinstance(excinfo.value, VMFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        path, line, name = self.original.reportinfo()
        return Path(path), line, f"{name} [in the test VM]"


_SESSION = pytest.StashKey[Session]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARK}: needs device-mapper; runs inside the test VM where the kernel lacks it"
    )
    if IN_VM and "VMDISK_TESTVM_REPORT" in os.environ:
        config.pluginmanager.register(_InVMReporter(), "testvm-reporter")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if IN_VM or device_mapper_available():
        return
    marked = [item for item in items if item.get_closest_marker(MARK)]
    if not marked:
        return
    state = Session([item.nodeid for item in marked])
    config.stash[_SESSION] = state
    for index, item in enumerate(items):
        if item.get_closest_marker(MARK):
            items[index] = VMItem.from_parent(
                item.parent, name=item.name, original=item, session_run=state
            )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if state is None:
        return
    write = terminalreporter.write_line
    if state.run is None:
        write(f"testvm: {len(state.nodeids)} LVM/dm-crypt tests did not run: {state.error}")
        return
    results = state.results or {}
    counts = {kind: 0 for kind in ("passed", "failed", "skipped")}
    for outcome in results.values():
        counts[outcome.outcome] += 1
    missing = len(state.nodeids) - len(results)
    write(
        f"testvm: {len(results)} LVM/dm-crypt tests ran inside the test VM "
        f"(Debian kernel {state.kernel}, accelerator {state.run.accelerator.name}): "
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
        + (f", {missing} without a result" if missing else "")
        + f"; VM boot and run {state.run.seconds:.0f} s"
    )


# -- pytest: inside the VM -------------------------------------------------------------
class _InVMReporter:
    """Writes each test phase's outcome where the host reads it."""

    def __init__(self) -> None:
        self.path = Path(os.environ["VMDISK_TESTVM_REPORT"])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and report.outcome == "passed":
            return
        longrepr = ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            longrepr = str(report.longrepr[2])
        elif report.longrepr is not None:
            longrepr = str(report.longrepr)
        entry = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": longrepr,
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
