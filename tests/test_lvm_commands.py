"""The exact LVM and cryptsetup commands, in order, for what needs device-mapper.

This kernel has no device-mapper, so activation, thin pools, snapshots,
merges and dm-crypt mappings cannot run here.  These tests inject a
*recording runner* into host/lvm.py and host/crypt.py instead: it records
every argv (and stdin) and answers LVM's JSON reports from a small
in-memory model of the volume group.  test_lvm.py runs the same backend on
real lvm2 wherever device-mapper is not needed, and for real everywhere on
a node that has it.  No key material may appear in any argv.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from vmdisk.backends import lvm as lvm_backend
from vmdisk.backends.base import Blank, CreateRequest, DiskRef
from vmdisk.backends.lvm import LvmBackend, LvmParameters
from vmdisk.errors import InsufficientCapacity
from vmdisk.host.crypt import Crypt
from vmdisk.host.lvm import Lvm
from vmdisk.host.run import CommandError, Result

MiB = 1024 * 1024
KEY = b"\x00\x01secret-key-bytes\xff" * 2


class RecordingRunner:
    """Records argv and stdin; plays LVM from an in-memory model (device-mapper is missing)."""

    def __init__(self, mapper: Path, vg_free: int = 1024 * MiB) -> None:
        self.calls: list[list[str]] = []
        self.stdin: list[str | None] = []
        self.lvs: dict[str, dict[str, Any]] = {}
        self.mapper = mapper
        self.vg_free = vg_free

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 0,
        input_data: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        argv = list(argv)
        self.stdin.append(input_data)
        out = self._play(argv)
        if argv[0] not in ("lvs", "vgs"):
            self.calls.append(argv)
        return Result(argv, out, "")

    @staticmethod
    def _opt(argv: list[str], name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    def _report(self, kind: str, rows: list[dict[str, str]]) -> str:
        return json.dumps({"report": [{kind: rows}]})

    def _play(self, argv: list[str]) -> str:
        cmd, target = argv[0], argv[-1]
        lv = target.split("/")[-1]
        if cmd == "vgs":
            return self._report(
                "vg",
                [
                    {
                        "vg_name": "vg0",
                        "vg_size": "2147483648",
                        "vg_free": str(self.vg_free),
                        "vg_extent_size": "4194304",
                    }
                ],
            )
        if cmd == "lvs":
            select = self._opt(argv, "-S") or ""
            rows = [
                {
                    "lv_name": n,
                    "vg_name": "vg0",
                    "lv_size": str(v["size"]),
                    "lv_attr": "-wi-a-----" if v.get("active", True) else "-wi-------",
                    "lv_tags": ",".join(v["tags"]),
                    "pool_lv": v.get("pool", ""),
                    "origin": "",
                    "segtype": v["segtype"],
                    "data_percent": "1.00" if v["segtype"] == "thin" else "",
                }
                for n, v in self.lvs.items()
                if select in ("", f"lv_name={n}") or select.removeprefix("lv_tags=") in v["tags"]
            ]
            return self._report("lv", rows)
        if cmd == "lvcreate":
            name = self._opt(argv, "-n")
            assert name is not None
            size = self._opt(argv, "-L") or self._opt(argv, "-V")
            tags = [argv[i + 1] for i, a in enumerate(argv) if a == "--addtag"]
            if "-s" in argv:
                origin = self.lvs[lv]
                size, segtype = str(origin["size"]) + "b", origin["segtype"]
            else:
                segtype = "thin" if "--thinpool" in argv else "linear"
            assert size is not None
            if segtype == "linear" and int(size[:-1]) > self.vg_free:
                raise CommandError(argv, 5, "", '  Volume group "vg0" has insufficient free space')
            self.lvs[name] = {"size": int(size[:-1]), "tags": tags, "segtype": segtype}
        elif cmd == "lvextend":
            self.lvs[lv]["size"] = int((self._opt(argv, "-L") or "0b")[:-1])
        elif cmd == "lvchange":
            tags = self.lvs[lv]["tags"]
            dropped = {argv[i + 1] for i, a in enumerate(argv) if a == "--deltag"}
            tags[:] = [t for t in tags if t not in dropped]
            tags += [argv[i + 1] for i, a in enumerate(argv) if a == "--addtag"]
            if "-ay" in argv or "-an" in argv:
                self.lvs[lv]["active"] = "-ay" in argv
        elif cmd in ("lvremove", "lvconvert"):
            del self.lvs[lv]
        elif cmd == "cryptsetup" and argv[1] == "open":
            (self.mapper / argv[-1]).touch()
        elif cmd == "cryptsetup" and argv[1] == "close":
            (self.mapper / argv[-1]).unlink()
        return ""

    def commands(self) -> list[str]:
        return [" ".join(a) for a in self.calls]


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordingRunner:
    runner = RecordingRunner(tmp_path)
    # Data writers do not go through LVM's runner; record them in the same list.
    monkeypatch.setattr(
        lvm_backend.blockdev,
        "zero",
        lambda dev, offset=0: runner.calls.append(["blkdiscard", str(dev)]),
    )
    monkeypatch.setattr(
        lvm_backend.blockdev,
        "grow_filesystem",
        lambda dev, fs: runner.calls.append(["resize2fs", str(dev)]) or True,
    )
    monkeypatch.setattr(
        lvm_backend,
        "make_filesystem",
        lambda dev, fs: runner.calls.append([f"mkfs.{fs}", str(dev)]),
    )
    return runner


def backend_for(recorder: RecordingRunner) -> LvmBackend:
    lvm = Lvm(runner=recorder)
    return LvmBackend("vg0", lvm=lvm, crypt=Crypt(runner=recorder, mapper_dir=recorder.mapper))


TAGS = "--addtag vmdisk --addtag vmdisk.disk=vms/db"


def test_create_resize_snapshot_rollback_delete(recorder: RecordingRunner) -> None:
    backend, ref = backend_for(recorder), DiskRef("vms", "db", "vg0")
    backend.create(ref, CreateRequest(64 * MiB, Blank("ext4")))
    backend.resize(ref, 128 * MiB)
    backend.create_snapshot(ref, "s1")
    backend.rollback(ref, "s1")
    backend.delete(ref)
    snap = "--addtag vmdisk --addtag vmdisk.disk=vms/db --addtag vmdisk.snapshot=s1"
    assert recorder.commands() == [
        f"lvcreate --yes --wipesignatures y -n vms_db {TAGS} --addtag vmdisk.partial "
        "--addtag vmdisk.fs=ext4 --type linear -L 67108864b -- vg0",  # lvcreate activates
        "blkdiscard /dev/vg0/vms_db",
        "mkfs.ext4 /dev/vg0/vms_db",
        "lvchange --deltag vmdisk.partial -- vg0/vms_db",
        "lvextend -L 134217728b -- vg0/vms_db",
        "resize2fs /dev/vg0/vms_db",
        f"lvcreate --yes -s -n vms_db_s1 {snap} -L 134217728b -- vg0/vms_db",
        "lvconvert --merge --interval 1 -- vg0/vms_db_s1",
        f"lvcreate --yes -s -n vms_db_s1 {snap} -L 134217728b -- vg0/vms_db",
        "lvchange --addtag vmdisk.restored=s1 -- vg0/vms_db",
        "lvchange -an -- vg0/vms_db_s1",
        "lvremove --yes -- vg0/vms_db_s1",
        "lvchange -an -- vg0/vms_db",
        "lvremove --yes -- vg0/vms_db",
    ]


def test_thin_volume_and_thin_snapshot(recorder: RecordingRunner) -> None:
    recorder.lvs["vmdisk-thinpool"] = {"size": 512 * MiB, "tags": [], "segtype": "thin-pool"}
    thin = LvmParameters(thin=True)
    backend, ref = backend_for(recorder), DiskRef("vms", "db", "vg0", parameters=thin)
    backend.create(ref, CreateRequest(1024 * MiB, Blank()))
    backend.create_snapshot(ref, "s1")
    backend.rollback(ref, "s1")
    snap = "--addtag vmdisk --addtag vmdisk.disk=vms/db --addtag vmdisk.snapshot=s1"
    assert recorder.commands() == [
        f"lvcreate --yes --wipesignatures y -n vms_db {TAGS} --addtag vmdisk.partial "
        "--type thin -V 1073741824b --thinpool vmdisk-thinpool -- vg0",
        # no blkdiscard: the pool hands out zeroed blocks
        "lvchange --deltag vmdisk.partial -- vg0/vms_db",
        f"lvcreate --yes -s -n vms_db_s1 {snap} --setactivationskip n -- vg0/vms_db",
        "lvconvert --merge --interval 1 -- vg0/vms_db_s1",
        "lvchange -an -- vg0/vms_db",
        "lvchange -ay -K -- vg0/vms_db",
        f"lvcreate --yes -s -n vms_db_s1 {snap} --setactivationskip n -- vg0/vms_db",
        "lvchange --addtag vmdisk.restored=s1 -- vg0/vms_db",
    ]


def test_encrypted_create_unlock_and_delete_keep_the_key_off_argv(
    recorder: RecordingRunner,
) -> None:
    backend, ref = backend_for(recorder), DiskRef("vms", "db", "vg0", encrypted=True)
    state = backend.create(ref, CreateRequest(64 * MiB, Blank(), encryption_key=KEY))
    assert state.virtual_size == 64 * MiB
    mapper = f"{recorder.mapper}/vmdisk_vg0-vms_db"
    assert backend.location(ref).path == mapper
    recorder.calls.clear()
    (recorder.mapper / "vmdisk_vg0-vms_db").unlink()  # as after a reboot
    backend.unlock(ref, KEY)
    backend.resize(ref, 128 * MiB)
    backend.delete(ref)
    assert recorder.commands() == [
        "cryptsetup open --type luks2 --disable-keyring --key-file=- /dev/vg0/vms_db "
        "vmdisk_vg0-vms_db",
        f"lvextend -L {128 * MiB + 16 * MiB}b -- vg0/vms_db",
        "cryptsetup resize vmdisk_vg0-vms_db",
        "cryptsetup close vmdisk_vg0-vms_db",
        "lvchange -an -- vg0/vms_db",
        "lvremove --yes -- vg0/vms_db",
    ]
    secrets = {KEY.hex(), KEY.decode("latin-1"), "secret-key-bytes"}
    assert not any(s in " ".join(argv) for argv in recorder.calls for s in secrets)
    assert KEY.hex() in recorder.stdin


def test_encrypted_create_order_and_failure_removes_mapping_and_lv(
    recorder: RecordingRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, ref = backend_for(recorder), DiskRef("vms", "db", "vg0", encrypted=True)

    def broken(dev: Path, offset: int = 0) -> None:
        recorder.calls.append(["blkdiscard", str(dev)])
        raise CommandError(["blkdiscard"], 1, "", "I/O error")

    monkeypatch.setattr(lvm_backend.blockdev, "zero", broken)
    with pytest.raises(CommandError):
        backend.create(ref, CreateRequest(64 * MiB, Blank(), encryption_key=KEY))
    commands = recorder.commands()
    assert commands[0].startswith("lvcreate --yes --wipesignatures y -n vms_db ")
    assert "--addtag vmdisk.luks2" in commands[0] and commands[0].endswith(
        f"-L {80 * MiB}b -- vg0"
    )  # 16 MiB LUKS2 header on top of the disk
    assert commands[1:] == [
        "cryptsetup luksFormat --batch-mode --type luks2 --offset 32768 --pbkdf argon2id "
        "--pbkdf-force-iterations 4 --pbkdf-memory 65536 --pbkdf-parallel 1 --key-file=- "
        "/dev/vg0/vms_db",
        "cryptsetup open --type luks2 --disable-keyring --key-file=- /dev/vg0/vms_db "
        "vmdisk_vg0-vms_db",
        f"blkdiscard {recorder.mapper}/vmdisk_vg0-vms_db",
        "cryptsetup close vmdisk_vg0-vms_db",  # remove_volume_on_error: mapping, then LV
        "lvchange -an -- vg0/vms_db",
        "lvremove --yes -- vg0/vms_db",
    ]
    assert recorder.lvs == {} and not any(recorder.mapper.iterdir())
    assert not any(KEY.hex() in c for c in commands)


def test_full_volume_group_maps_to_insufficient_capacity(recorder: RecordingRunner) -> None:
    recorder.vg_free = 8 * MiB
    backend = backend_for(recorder)
    with pytest.raises(InsufficientCapacity, match="insufficient free space"):
        backend.create(DiskRef("vms", "db", "vg0"), CreateRequest(64 * MiB, Blank()))
    assert recorder.lvs == {}
