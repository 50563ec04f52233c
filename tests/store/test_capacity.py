"""The capacity budget: LRU eviction, shared chunks kept, clean failure when full."""

from __future__ import annotations

import errno
import os

import pytest

from tests.store.helpers import FINGERPRINT, MODEL, FakeClock, StoreFactory, blob, read_all
from torpor.errors import ResourceExhausted
from torpor.store import chunks
from torpor.store.chunks import ChunkRef, hash_bytes
from torpor.store.snapshots import SnapshotStore


def write(store: SnapshotStore, *tensors: bytes, reserve: int | None = None) -> str:
    """Write a snapshot, reserving what a writer that hashed ahead would: the new bytes."""
    if reserve is None:
        refs = {ChunkRef(hash_bytes(t), len(t)) for t in tensors}
        reserve = sum(ref.size for ref in refs if not store.chunks.has(ref))
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=reserve) as w:
        for t in tensors:
            w.add_tensor(t)
        return w.commit({}).id


def ids(store: SnapshotStore) -> set[str]:
    return {s.id for s in store.list(include_corrupt=True)}


def intact(store: SnapshotStore, snapshot_id: str, *tensors: bytes) -> bool:
    return b"".join(read_all(store, snapshot_id)) == b"".join(tensors)


def test_least_recently_used_goes_first(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store(capacity=3000)
    a, b, c = (blob(n, 1000) for n in "abc")
    snap = {}
    for name, data in zip("abc", (a, b, c), strict=True):
        snap[name] = write(store, data)
        clock.advance(10)
    store.touch(snap["a"])  # a is now the most recently used
    clock.advance(10)
    snap["d"] = write(store, blob("d", 1000))
    assert ids(store) == {snap["a"], snap["c"], snap["d"]}  # b was the LRU
    clock.advance(10)
    snap["e"] = write(store, blob("e", 1000))
    assert ids(store) == {snap["a"], snap["d"], snap["e"]}  # then c
    assert intact(store, snap["a"], a)
    assert store.usage().used_bytes == 3000


def test_a_chunk_still_referenced_is_never_deleted(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store(capacity=2000)
    shared, only_a, only_b = blob("s", 800), blob("a", 400), blob("b", 400)
    a = write(store, shared, only_a)
    clock.advance(10)
    b = write(store, shared, only_b)
    assert store.usage().used_bytes == 1600
    clock.advance(10)
    # 700 bytes needed, 400 free: evicting a frees only its own 400 (shared stays for b).
    c = write(store, blob("c", 700))
    assert ids(store) == {b, c}
    assert intact(store, b, shared, only_b)
    assert store.usage().used_bytes == 800 + 400 + 700
    assert store.scrub().snapshots_marked_corrupt == ()
    del a


def test_eviction_frees_shared_chunks_with_their_last_user(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store(capacity=2000)
    shared = blob("s", 800)
    write(store, shared, blob("a", 400))
    clock.advance(10)
    write(store, shared, blob("b", 400))
    clock.advance(10)
    big = write(store, blob("big", 2000))  # needs everything: both go, shared chunk too
    assert ids(store) == {big}
    assert store.usage().used_bytes == 2000
    assert len(store.chunks.scan().chunks) == 1


def test_too_big_fails_and_changes_nothing(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store(capacity=3000)
    kept = [write(store, blob(f"k{i}", 1000)) for i in range(2)]
    before = (store.usage(), store.chunks.scan())
    with pytest.raises(ResourceExhausted) as err:
        write(store, blob("huge", 3001))
    assert err.value.reason == "STORE_FULL"
    assert int(err.value.metadata["need_bytes"]) == 3001
    assert ids(store) == set(kept)
    assert (store.usage(), store.chunks.scan()) == before
    assert list(store.locks.writers_dir.iterdir()) == []


def test_held_snapshots_are_never_evicted(make_store: StoreFactory, clock: FakeClock) -> None:
    """A snapshot torpord holds (its policy counts it and restores from it) is never an
    LRU victim; a release makes it one again."""
    store = make_store(capacity=2000)
    old = write(store, blob("old", 1000))
    store.hold(old)
    clock.advance(10)
    newer = write(store, blob("newer", 1000))
    clock.advance(10)
    newest = write(store, blob("newest", 1000))
    assert ids(store) == {old, newest}  # newer went, although old is older
    store.hold(newest)
    with pytest.raises(ResourceExhausted):
        write(store, blob("more", 1000))
    assert ids(store) == {old, newest}
    store.release(old)
    more = write(store, blob("more", 1000))
    assert ids(store) == {newest, more}
    del newer


def test_corrupt_snapshots_go_before_complete_ones(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store(capacity=2000)
    old = write(store, blob("old", 1000))
    clock.advance(10)
    bad = write(store, blob("bad", 1000))
    store.mark_corrupt(bad, "test")
    clock.advance(10)
    new = write(store, blob("new", 1000))
    assert ids(store) == {old, new}


def test_a_snapshot_being_restored_is_skipped(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store(capacity=2000)
    lru, lru_data = write(store, blob("lru", 1000)), blob("lru", 1000)
    clock.advance(10)
    other = write(store, blob("other", 1000))
    clock.advance(10)
    with store.reading(lru):
        new = write(store, blob("new", 1000))
        assert ids(store) == {lru, new}
        assert intact(store, lru, lru_data)
    del other


def test_reservations_of_live_writers_count(make_store: StoreFactory) -> None:
    store = make_store(capacity=3000)
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=2000) as first:
        assert store.usage().free_bytes == 1000
        with pytest.raises(ResourceExhausted):
            store.begin(MODEL, FINGERPRINT, reserve_bytes=1500)
        first.add_tensor(blob("x", 500))
        assert (store.usage().used_bytes, store.usage().reserved_bytes) == (500, 1500)
        first.commit({})
    assert store.usage().reserved_bytes == 0


def test_an_underestimated_reservation_grows_and_evicts(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store(capacity=2000)
    old = write(store, blob("old", 1500))
    clock.advance(10)
    new = write(store, blob("n1", 500), blob("n2", 500), reserve=0)
    assert ids(store) == {new}
    del old
    # Growing past the whole budget fails the write. Unlike a reservation made up front,
    # growth evicts chunk by chunk, so `new` went for x before y could not fit.
    with pytest.raises(ResourceExhausted):
        write(store, blob("x", 1500), blob("y", 1500), reserve=0)
    assert ids(store) == set()
    assert (store.usage().used_bytes, store.usage().reserved_bytes) == (0, 0)
    report = store.scrub()
    assert (report.orphan_files_removed, report.unreferenced_chunks_removed) == (0, 0)


def test_disk_full_mid_snapshot_leaves_existing_snapshots_intact(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept_data = [blob("k1", 3000), blob("k2", 70_000)]
    kept = write(store, *kept_data)
    real_write = os.write
    budget = {"bytes": 5000}

    def write_until_full(fd: int, data: memoryview) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(store.chunks.root)):
            return real_write(fd, data)
        if budget["bytes"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, data[: budget["bytes"]])
        budget["bytes"] -= n
        return n

    monkeypatch.setattr(chunks.os, "write", write_until_full)
    with pytest.raises(ResourceExhausted) as err:
        write(store, blob("n1", 4000), blob("n2", 4000), blob("n3", 4000))
    assert err.value.reason == "STORE_FULL"
    assert ids(store) == {kept}
    assert store.usage().used_bytes == sum(map(len, kept_data))
    assert store.usage().reserved_bytes == 0
    scan = store.chunks.scan()
    assert scan.temps == ()  # nothing half-visible
    with store.reading(kept) as contents:
        assert set(scan.chunks) == set(contents.chunks)  # the new chunks were collected
    assert store.scrub().orphan_files_removed == 0
    assert intact(store, kept, *kept_data)
    monkeypatch.setattr(chunks.os, "write", real_write)
    assert intact(store, write(store, blob("n1", 4000)), blob("n1", 4000))
