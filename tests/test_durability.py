"""A converted disk's data reaches stable storage before the disk is renamed into place.

Observed with strace on a real ``vmdisk apply`` (qemu-img included, ``-f``
follows it): the sync has to be on the data file, and before the rename of
the partial directory, or a crash right after the rename leaves a Ready disk
whose blocks were never written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from conftest import sha256_of
from test_cli import VMDISK, vmdisk_doc, write_manifests
from vmdisk.host import qemu_img

# 1234 fdatasync(8</state/disks/default/.root.partial/disk>) = 0, or split in two lines:
# 1234 fdatasync(8</…/disk> <unfinished ...>  then  1234 <... fdatasync resumed>) = 0
_SYNC = re.compile(r"^(?P<pid>\d+)\s+(?:fsync|fdatasync)\(\d+<(?P<path>[^>]*)>(?P<rest>.*)$")
# 1234 rename("/…/.root.partial", "/…/root") = 0, or split like the syncs
_RENAME = re.compile(r'^\d+\s+rename(?:at2?)?\(.*?"(?P<src>[^"]+)",.*?"(?P<dst>[^"]+)"')


def _apply_traced(
    tmp_path: Path,
    image_dir: Path,
    backend: str,
    image: str | None,
    names: tuple[str, ...] = ("root",),
) -> list[str]:
    """strace lines of one ``vmdisk apply`` of disks ``names`` (from ``image``, else blank)."""
    source: dict[str, object] = {"blank": {}}
    if image is not None:
        path = image_dir / image
        source = {"image": {"url": f"file://{path}", "checksum": sha256_of(path)}}
    docs = [vmdisk_doc(name, backend=backend, size="32Mi", source=source) for name in names]
    manifest = write_manifests(tmp_path / "disk.yaml", *docs)
    trace = tmp_path / "trace"
    argv = ["strace", "-f", "-y", "-qq", "-o", str(trace)]
    argv += ["-e", "trace=fsync,fdatasync,rename,renameat,renameat2,execve"]
    env = {**os.environ, "VMDISK_NODE_NAME": "node-a", "VMDISK_IMAGE_DIRS": str(image_dir)}
    result = subprocess.run(
        [*argv, *VMDISK, "apply", "-f", str(manifest), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return trace.read_text().splitlines()


def _synced_before_rename(lines: list[str], state: Path, name: str = "root") -> tuple[bool, bool]:
    """(data file synced before the rename, the rename seen at all)."""
    disks = state / "disks" / "default"
    partial, final = str(disks / f".{name}.partial"), str(disks / name)
    events = _events(lines)
    synced = ("sync", f"{partial}/disk", "")
    for index, event in enumerate(events):
        if event == ("rename", partial, final):
            return synced in events[:index], True
    return synced in events, False


def test_raw_disk_from_qcow2_is_synced_before_it_is_renamed(tmp_path: Path, image_dir: Path):
    lines = _apply_traced(tmp_path, image_dir, "raw", "base.qcow2")
    synced, renamed = _synced_before_rename(lines, tmp_path / "state")
    assert renamed, "\n".join(lines)
    assert synced, "the converted data file was never fsynced before the rename:\n" + "\n".join(
        lines
    )


def test_raw_disk_from_raw_is_synced_before_it_is_renamed(tmp_path: Path, image_dir: Path):
    """The other raw path: a sparse copy of a raw cache entry."""
    lines = _apply_traced(tmp_path, image_dir, "raw", "base.raw")
    synced, renamed = _synced_before_rename(lines, tmp_path / "state")
    assert renamed and synced, "\n".join(lines)


def test_qcow2_overlays_of_one_base_are_copies_made_once_and_synced(
    tmp_path: Path, image_dir: Path
):
    """One ``qemu-img create`` for three overlays; each copy is the bytes qemu-img writes,
    synced before its disk is renamed into place."""
    names = ("a", "b", "c")
    lines = _apply_traced(tmp_path, image_dir, "qcow2", "base.raw", names)
    creates = [line for line in lines if "execve(" in line and '"create"' in line]
    assert len(creates) == 1, "\n".join(creates)
    state = tmp_path / "state"
    for name in names:
        assert _synced_before_rename(lines, state, name) == (True, True), name
    disks = state / "disks" / "default"
    base = json.loads((disks / "a" / "disk.json").read_text())["base_path"]
    made = tmp_path / "made.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", str(made), "32M"]
    subprocess.run(argv, check=True)
    for name in names:
        data = disks / name / "disk"
        assert data.read_bytes() == made.read_bytes(), name
        assert qemu_img.check(data, "qcow2") is None
        assert qemu_img.info(data, "qcow2").backing_file == base


def _events(lines: list[str]) -> list[tuple[str, str, str]]:
    """("rename", src, dst) and ("sync", path, "") in the order the calls returned."""
    events: list[tuple[str, str, str]] = []
    pending: dict[str, tuple[str, str, str]] = {}
    for line in lines:
        pid = line.split(None, 1)[0]
        if (m := _SYNC.match(line)) is not None:
            event = ("sync", m["path"], "")
            if "unfinished" in m["rest"]:
                pending[pid] = event
            elif re.match(r"\)\s+=\s+0", m["rest"]):
                events.append(event)
        elif (m := _RENAME.match(line)) is not None:
            event = ("rename", m["src"], m["dst"])
            if "unfinished" in line:
                pending[pid] = event
            elif re.search(r"=\s+0$", line):
                events.append(event)
        elif "resumed>" in line and re.search(r"=\s+0$", line) and pid in pending:
            events.append(pending.pop(pid))
    return events


def test_a_pin_is_durable_before_its_disk_and_every_object_before_apply_returns(
    tmp_path: Path, image_dir: Path
):
    """Object renames may share one directory fsync, except the status that pins a
    disk's class: it is synced before the disk is renamed into place (a power cut
    must not forget where a disk is), and nothing is left unsynced at the end."""
    names = ("a", "b", "c", "d")
    # Blank disks: no download whose progress would be written between pin and disk.
    events = _events(_apply_traced(tmp_path, image_dir, "qcow2", None, names))
    state = tmp_path / "state"
    objects = str(state / "objects" / "vmdisks" / "default")
    disks = str(state / "disks" / "default")
    for name in names:
        made = events.index(("rename", f"{disks}/.{name}.partial", f"{disks}/{name}"))
        obj = f"{objects}/{name}.json"
        pin = max(i for i, e in enumerate(events[:made]) if e[0] == "rename" and e[2] == obj)
        assert ("sync", objects, "") in events[pin:made], name
        assert ("sync", disks, "") in events[made:], name
    last = max(i for i, e in enumerate(events) if e[0] == "rename" and e[2].startswith(objects))
    assert ("sync", objects, "") in events[last:]


_WRITES = (
    "write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,rename,renameat,renameat2,"
    "unlink,unlinkat,truncate,ftruncate,fallocate,mkdir,mkdirat"
)
# 1234 fsync(5</state/objects/...>) = 0   /   1234 rename("/state/...", ...) = 0
_CALL = re.compile(r"^\d+\s+(?P<call>\w+)\((?P<args>.*)$")


def test_a_no_op_re_apply_writes_nothing(tmp_path: Path, image_dir: Path):
    """Re-applying unchanged manifests of unchanged disks only reads: no write, sync or rename."""
    image = image_dir / "base.qcow2"
    source = {"image": {"url": f"file://{image}", "checksum": sha256_of(image)}}
    docs = [vmdisk_doc(f"q{i}", backend="qcow2", size="32Mi", source=source) for i in range(5)]
    docs += [vmdisk_doc(f"r{i}", backend="raw", size="8Mi", source={"blank": {}}) for i in range(5)]
    manifest = write_manifests(tmp_path / "disks.yaml", *docs)
    state = tmp_path / "state"
    env = {**os.environ, "VMDISK_NODE_NAME": "node-a", "VMDISK_IMAGE_DIRS": str(image_dir)}
    apply = [*VMDISK, "apply", "-f", str(manifest), "--state-dir", str(state)]
    first = subprocess.run(apply, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr

    trace = tmp_path / "trace"
    argv = ["strace", "-f", "-y", "-qq", "-o", str(trace), "-e", f"trace={_WRITES}"]
    again = subprocess.run([*argv, *apply], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    calls = [m for line in trace.read_text().splitlines() if (m := _CALL.match(line))]
    assert any(m["call"] == "write" for m in calls), "strace saw no writes at all (stdout?)"
    in_state = [f"{m['call']}({m['args']}" for m in calls if str(state) in m["args"]]
    assert in_state == [], "\n".join(in_state)
