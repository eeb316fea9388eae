"""The agent's Lookup over kopf's real indexes, read from a worker thread while
the event loop changes them (the agent's threading: kopf runs sync handlers in
an executor and indexes objects on the loop).

No API server: the index is kopf's own class, fed by a coroutine on a real loop
in place of a watch stream, so the race runs thousands of times in a second.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kopf._core.engines.indexing import OperatorIndexer

from vmdisk.api.vmdisk import VMDisk
from vmdisk.operator.lookup import Indexed, IndexLookup, LoopReads, source_keys

NS = "vms"


def body(name: str, rv: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "VMDisk",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "resourceVersion": f"{rv}",
        },
        "spec": {"nodeName": "node-a", "backend": "qcow2", "size": "1Gi", "source": {"blank": {}}},
    }


def index(indexer: OperatorIndexer, name: str, rv: int = 1) -> None:
    """What kopf does on the loop for one watch event of a VMDisk."""
    b = body(name, rv)
    indexer.replace((NS, name, f"uid-{name}"), {(NS, name): Indexed(b)})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread, as kopf's is beside its executor."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def churn(loop: asyncio.AbstractEventLoop, indexer: OperatorIndexer) -> Callable[[], int]:
    """Create and delete disks on the loop until stopped; returns the stopper (events seen)."""
    stop = threading.Event()
    events = 0

    async def run() -> None:
        nonlocal events
        i = 0
        while not stop.is_set():
            # A burst per loop iteration, like a watch stream delivering many events.
            for _ in range(50):
                name = f"churn-{i % 400}"
                if i % 800 < 400:
                    index(indexer, name, i)
                else:
                    indexer.discard((NS, name, f"uid-{name}"))
                i += 1
                events += 1
            await asyncio.sleep(0)

    future = asyncio.run_coroutine_threadsafe(run(), loop)

    def stopper() -> int:
        stop.set()
        future.result(10)
        return events

    return stopper


def test_workers_read_the_index_while_the_loop_changes_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Before the reads went through the loop, this raised ``RuntimeError: dictionary
    changed size during iteration`` (kopf retried the handler a minute later)."""
    disks = OperatorIndexer()
    for i in range(600):
        index(disks, f"d{i:04d}")
    reads = LoopReads()
    reads.bind(loop)
    lookup = IndexLookup(disks.index, OperatorIndexer().index, {}, reads)
    stop = churn(loop, disks)
    # A count of reads, not a time: a loaded machine makes each read slower, not fewer.
    calls, deadline = 0, time.monotonic() + 60.0
    try:
        while calls < 20 and time.monotonic() < deadline:
            found = {d.metadata.name for d in lookup.list_disks(NS)}
            # The 600 stable disks are always there, whatever the churn did meanwhile.
            assert {f"d{i:04d}" for i in range(600)} <= found
            assert lookup.get_disk(NS, "d0001") is not None
            calls += 1
    finally:
        events = stop()
    assert calls == 20 and events > 1000  # the two really ran side by side


def test_each_indexed_body_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion scans the namespace; it validates only bodies it has not seen."""
    disks = OperatorIndexer()
    for i in range(50):
        index(disks, f"d{i:02d}")
    parsed: list[str] = []
    original = VMDisk.model_validate

    def counting(obj: Any) -> VMDisk:
        parsed.append(obj["metadata"]["name"])
        return original(obj)

    monkeypatch.setattr(VMDisk, "model_validate", counting)
    lookup = IndexLookup(disks.index, OperatorIndexer().index)
    assert len(lookup.list_disks(NS)) == 50
    assert len(parsed) == 50
    assert len(lookup.list_disks(NS)) == 50
    assert lookup.get_disk(NS, "d07") is not None
    assert len(parsed) == 50  # nothing parsed again
    index(disks, "d07", rv=2)  # the object changed: kopf indexes a new body
    assert lookup.list_disks(NS)[0].metadata.namespace == NS
    assert parsed[50:] == ["d07"]


def test_an_invalid_body_is_skipped_not_raised() -> None:
    disks = OperatorIndexer()
    index(disks, "good")
    bad = body("bad")
    bad["spec"]["size"] = "lots"
    disks.replace((NS, "bad", "uid-bad"), {(NS, "bad"): Indexed(bad)})
    lookup = IndexLookup(disks.index, OperatorIndexer().index)
    assert [d.metadata.name for d in lookup.list_disks(NS)] == ["good"]
    assert lookup.get_disk(NS, "bad") is None
    assert lookup.list_disks("elsewhere") == []


class NoScan(dict[Any, Any]):
    """An index that may be asked for keys but never walked (a walk is O(namespace))."""

    def items(self) -> Any:
        raise AssertionError("the whole index was walked")

    def values(self) -> Any:
        raise AssertionError("the whole index was walked")

    def __iter__(self) -> Any:
        raise AssertionError("the whole index was walked")


def test_dependents_come_from_the_sources_indexes_without_a_scan() -> None:
    """What a deletion asks (snapshots of a disk, disks made from it), through kopf's
    real indexes of sources: only the dependents are read, never the namespace."""
    clone = body("clone")
    clone["spec"]["source"] = {"disk": {"name": "a"}}
    snap = {
        "apiVersion": "vmdisk.io/v1alpha1",
        "kind": "DiskSnapshot",
        "metadata": {"name": "s", "namespace": NS},
        "spec": {"diskName": "a"},
    }
    disks = NoScan({(NS, "a"): [Indexed(body("a"))], (NS, "clone"): [Indexed(clone)]})
    snapshots = NoScan({(NS, "s"): [Indexed(snap)]})
    disk_sources, snapshot_sources = OperatorIndexer(), OperatorIndexer()
    made = [
        ("clone", clone, disk_sources),
        ("s", snap, snapshot_sources),
        ("a", body("a"), disk_sources),
    ]
    for key, obj, indexer in made:  # what kopf does on the loop for each watch event
        spec = obj["spec"]
        indexer.replace((NS, key, f"uid-{key}"), dict.fromkeys(source_keys(NS, spec), key))
    lookup = IndexLookup(disks, snapshots, sources=(disk_sources.index, snapshot_sources.index))
    assert [d.metadata.name for d in lookup.disks_from(NS, "disk", "a")] == ["clone"]
    assert [s.metadata.name for s in lookup.snapshots_of(NS, "a")] == ["s"]
    assert lookup.disks_from(NS, "snapshot", "a") == []
    assert lookup.snapshots_of(NS, "clone") == []


def test_malformed_specs_have_no_sources() -> None:
    assert source_keys(NS, {"source": {"disk": ["x"]}}) == []
    assert source_keys(NS, {"diskName": ["x"]}) == []
    assert source_keys(NS, "not a spec") == []
    assert source_keys(NS, {"source": {"snapshot": {"name": "s1"}}}) == [(NS, "snapshot", "s1")]
