"""torpord's side of the store (scheduler/recorder.py) over the real store and catalog: room
reserved before the worker writes, what the worker reports committed, each model's current
snapshot held from the LRU and its superseded ones deleted, every restore under the read
lock, and the bytes outside the tracked snapshots measured for the core (issue 13). The
worker is played by the test: it puts chunks into the chunk store as a worker does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.store.helpers import MODEL, FakeClock, StoreFactory, blob, read_all
from torpor.errors import FailedPrecondition, ResourceExhausted
from torpor.scheduler.core import Costs
from torpor.scheduler.recorder import Recorder
from torpor.scheduler.snapshots import WrittenSnapshot
from torpor.store.snapshots import SnapshotStore

FINGERPRINT = "torpor-snapshot/1 torch2.5 cpu"


def _recorder(store: SnapshotStore) -> tuple[Recorder, list[int]]:
    recorder = Recorder(store.catalog, store, Costs, lambda _: None)
    outside: list[int] = []
    recorder.on_outside = outside.append
    return recorder, outside


def _worker_writes(store: SnapshotStore, seed: str, sizes: list[int]) -> WrittenSnapshot:
    """What a worker does: put the chunks, the manifest chunk first in the reply."""
    refs = [store.chunks.put(blob(f"{seed}:{i}", n)) for i, n in enumerate(sizes)]
    manifest = store.chunks.put(f"manifest of {seed}".encode())
    return WrittenSnapshot(manifest.hash, FINGERPRINT, (manifest, *refs))


def _record(recorder: Recorder, seed: str, sizes: list[int]) -> tuple[str, WrittenSnapshot]:
    """Reserve, let the worker write, commit: the snapshot's id and what was written."""

    async def go() -> tuple[str, WrittenSnapshot]:
        async with recorder.writing(MODEL, sum(sizes) + 1024) as pending:
            written = _worker_writes(recorder.store, seed, sizes)
            info = await pending.commit(written)
        return info.id, written

    return asyncio.run(go())


def test_a_restore_reads_under_the_lock_and_moves_up_the_lru(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    """While a restore runs, deleting its snapshot is refused (SNAPSHOT_IN_USE) and the
    store's eviction cannot take it; the restore marks a use; afterwards it can go."""
    store = make_store(capacity=100_000)
    recorder, _ = _recorder(store)
    current, written_a = _record(recorder, "a", [30_000])
    store.release(current)  # not held: only the read lock protects it below
    written = store.get(current).last_used_at
    clock.advance(60)

    async def restore(during: Callable[[], Any]) -> Any:
        async with recorder.restoring(MODEL) as manifest_hash:
            assert manifest_hash == written_a.manifest_hash  # what the worker loads it by
            return await asyncio.to_thread(during)

    def delete() -> None:
        with pytest.raises(FailedPrecondition) as err:
            store.delete(current)
        assert err.value.reason == "SNAPSHOT_IN_USE"
        # An eviction that would need its bytes does not take them: STORE_FULL instead.
        with pytest.raises(ResourceExhausted):
            store.begin(MODEL, FINGERPRINT, reserve_bytes=90_000)

    asyncio.run(restore(delete))
    assert store.get(current).last_used_at > written  # LRU follows use
    assert len(read_all(store, current)) == 2
    store.delete(current)


def test_a_new_snapshot_supersedes_the_old_one(make_store: StoreFactory) -> None:
    """The old snapshot of the model is deleted (its unshared chunks too); the new one is
    held from the LRU and counted at the bytes the store holds for it."""
    store = make_store()
    recorder, outside = _recorder(store)
    _, old = _record(recorder, "old", [5000, 6000])
    new, _ = _record(recorder, "new", [7000])
    assert [s.id for s in store.list(MODEL, include_corrupt=True)] == [new]
    assert store.held() == {new} and recorder.latest[MODEL] == new
    assert recorder.snapshot_bytes(MODEL) == store.get(new).total_bytes
    assert outside[-1] == 0  # nothing on disk beyond the tracked snapshot
    assert not any(store.chunks.has(ref) for ref in old.chunks)


def test_the_bytes_outside_the_tracked_snapshots_are_measured(make_store: StoreFactory) -> None:
    """A snapshot no runtime restores from (another tool's) is outside the core's count of
    its runtimes: measured, and told to the core; a chunk it shares with the tracked one is
    counted there only."""
    store = make_store()
    recorder, outside = _recorder(store)
    with store.begin(MODEL, "another-environment", reserve_bytes=10_000) as w:
        w.add_tensor(blob("earlier", 4000))
        w.commit({})
    current, written = _record(recorder, "mine", [2000])
    assert outside[-1] == 0  # the earlier snapshot of the model was superseded: deleted
    with store.begin(MODEL, "another-environment", reserve_bytes=10_000) as w:
        w.add_stored(written.chunks[1])  # shared with the tracked snapshot
        w.add_tensor(blob("own", 4000))
        other = w.commit({})
    asyncio.run(recorder.measure_outside())
    assert outside[-1] == 4000
    assert store.held() == {current} and other.id != current


def test_a_reservation_that_cannot_fit_writes_nothing(make_store: StoreFactory) -> None:
    """STORE_FULL at the reservation, before the worker is asked: no row, no chunk."""
    store = make_store(capacity=10_000)
    recorder, _ = _recorder(store)

    async def go() -> None:
        async with recorder.writing(MODEL, 20_000):
            raise AssertionError("the worker must not be asked")

    with pytest.raises(ResourceExhausted) as err:
        asyncio.run(go())
    assert err.value.reason == "STORE_FULL"
    assert store.list(MODEL, include_corrupt=True) == ()
    assert store.usage().reserved_bytes == 0
