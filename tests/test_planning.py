"""The pure planner, checked exhaustively with generated specs and host states."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmdisk.api.vmdisk import VMDiskSpec, VMDiskStatus
from vmdisk.backends.base import DiskState
from vmdisk.engine.planning import Create, Resize, Restore, plan_disk
from vmdisk.errors import DiskMissing, ShrinkNotSupported, VMDiskError

MiB = 1024 * 1024
sizes = st.integers(min_value=1, max_value=1 << 44)


def spec(size: int | None, restore: str | None = None, backend: str | None = None) -> VMDiskSpec:
    data: dict[str, object] = {"source": {"blank": {}}, "size": size or 1}
    if size is None:
        data = {"source": {"image": {"url": "http://x/i"}}}
    if restore:
        data["restore"] = {"snapshot": restore}
    if backend:
        data["backend"] = backend
    return VMDiskSpec.model_validate(data)


def host(size: int, restored: str | None = None) -> DiskState:
    return DiskState(format="qcow2", virtual_size=size, actual_size=0, restored_snapshot=restored)


def test_new_disk_is_created_once_and_never_recreated():
    assert plan_disk(spec(MiB), None, None) == [Create()]
    made = VMDiskStatus(format="qcow2", path="/x", backend="qcow2")
    with pytest.raises(DiskMissing):
        plan_disk(spec(MiB), made, None)


def test_restore_is_applied_once_per_value():
    assert plan_disk(spec(MiB, "s1"), None, host(MiB)) == [Restore("s1"), Resize(MiB)]
    assert plan_disk(spec(MiB, "s1"), None, host(MiB, restored="s1")) == []
    assert plan_disk(spec(MiB, "s2"), None, host(MiB, restored="s1"))[0] == Restore("s2")


@given(wanted=st.one_of(st.none(), sizes), current=sizes, restored=st.sampled_from([None, "a"]))
def test_plans_only_grow(wanted: int | None, current: int, restored: str | None):
    try:
        actions = plan_disk(spec(wanted, restored), None, host(current))
    except ShrinkNotSupported:
        assert wanted is not None and wanted < current
        return
    except VMDiskError as exc:  # any other refusal must still be typed
        pytest.fail(f"unexpected refusal {exc.reason}")
    assert Create() not in actions
    for action in actions:
        if isinstance(action, Resize):
            assert action.size >= current and action.size == wanted
    if wanted == current and restored is None:
        assert actions == []
