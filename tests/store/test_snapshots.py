"""Snapshots: visibility, dedup, verification on read, deletion."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.store.helpers import FINGERPRINT, MODEL, FakeClock, StoreFactory, blob, read_all
from torpor.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from torpor.store.catalog import Catalog
from torpor.store.chunks import hash_bytes
from torpor.store.schema import SnapshotState
from torpor.store.snapshots import SnapshotStore


def weights(tag: str = "w", sizes: tuple[int, ...] = (5000, 300, 20_000, 7)) -> list[bytes]:
    """A model's tensors, deterministic per tag."""
    return [blob(f"{tag}:{i}", size) for i, size in enumerate(sizes)]


def write(store: SnapshotStore, tensors: list[bytes], manifest: dict | None = None) -> str:  # type: ignore[type-arg]
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=sum(map(len, tensors))) as w:
        for t in tensors:
            w.add_tensor(t)
        return w.commit(manifest or {"tensors": len(tensors)}).id


def read_back(store: SnapshotStore, snapshot_id: str) -> bytes:
    return b"".join(read_all(store, snapshot_id))


def test_a_snapshot_reads_back_bit_identical(store: SnapshotStore) -> None:
    tensors = weights()
    snapshot_id = write(store, tensors, {"arena": {"weights": 25_307}, "gpu": "cpu"})
    assert read_back(store, snapshot_id) == b"".join(tensors)
    with store.reading(snapshot_id) as contents:
        assert contents.manifest == {"arena": {"weights": 25_307}, "gpu": "cpu"}
        assert contents.info.state is SnapshotState.COMPLETE
        assert contents.info.total_bytes == sum(map(len, tensors))
    assert [s.id for s in store.list(MODEL)] == [snapshot_id]


def test_a_snapshot_is_invisible_until_committed(store: SnapshotStore) -> None:
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=100) as w:
        w.add_tensor(b"a" * 100)
        assert store.list(MODEL, include_corrupt=True) == ()
        with pytest.raises(NotFound):
            store.get(w.id)
        with pytest.raises(NotFound), store.reading(w.id):
            pass
        info = w.commit({})
    assert store.get(info.id).state is SnapshotState.COMPLETE


def test_leaving_without_commit_aborts_and_collects(store: SnapshotStore) -> None:
    with pytest.raises(RuntimeError), store.begin(MODEL, FINGERPRINT, reserve_bytes=10) as w:
        w.add_tensor(b"b" * 10)
        raise RuntimeError("worker failed mid-snapshot")
    assert store.list(include_corrupt=True) == ()
    assert store.usage().used_bytes == 0 and store.usage().reserved_bytes == 0
    assert store.chunks.scan().chunks == ()
    with pytest.raises(FailedPrecondition):
        w.add_tensor(b"c")


def test_same_weights_twice_store_no_new_bytes(store: SnapshotStore) -> None:
    tensors = weights()
    write(store, tensors)
    used = store.usage().used_bytes
    assert used == sum(map(len, tensors))
    files = set(store.chunks.scan().chunks)
    second = write(store, tensors)
    assert store.usage().used_bytes == used
    assert set(store.chunks.scan().chunks) == files
    assert read_back(store, second) == b"".join(tensors)


def test_a_changed_tensor_adds_only_its_bytes(store: SnapshotStore) -> None:
    tensors = weights()
    write(store, tensors)
    used = store.usage().used_bytes
    tuned = list(tensors)
    tuned[2] = blob("fine-tuned", len(tensors[2]))
    tuned_id = write(store, tuned)
    assert store.usage().used_bytes == used + len(tuned[2])
    assert read_back(store, tuned_id) == b"".join(tuned)


def test_huge_tensors_are_cut_at_fixed_offsets(make_store: StoreFactory) -> None:
    store = make_store(max_chunk=4096)
    big = blob("big", 4096 * 3 + 5)
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=len(big)) as w:
        refs = w.add_tensor(big)
        info = w.commit({})
    assert [r.size for r in refs] == [4096, 4096, 4096, 5]
    # A copy whose last piece changed shares the first three chunks.
    changed = big[:-5] + b"12345"
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=len(changed)) as w:
        refs2 = w.add_tensor(changed)
        w.commit({})
    assert refs2[:3] == refs[:3] and refs2[3] != refs[3]
    assert store.usage().used_bytes == 4096 * 3 + 10
    assert read_back(store, info.id) == big


def test_a_flipped_byte_is_detected_and_marks_the_snapshot_corrupt(
    store: SnapshotStore, catalog: Catalog
) -> None:
    tensors = weights()
    snapshot_id = write(store, tensors)
    with store.reading(snapshot_id) as contents:
        victim = contents.chunks[2]
    path = store.chunks.path(victim.hash)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    path.write_bytes(damaged)

    with pytest.raises(DataLoss) as err:
        read_back(store, snapshot_id)
    assert err.value.reason == "CHUNK_CORRUPT" and err.value.metadata["hash"] == victim.hash
    assert store.get(snapshot_id).state is SnapshotState.CORRUPT
    assert store.list(MODEL) == ()
    assert [s.id for s in store.list(MODEL, include_corrupt=True)] == [snapshot_id]
    with pytest.raises(DataLoss) as again, store.reading(snapshot_id):
        pass
    assert again.value.reason == "SNAPSHOT_CORRUPT"
    (event,) = catalog.events_after(0)
    assert event.kind == "snapshot_corrupt" and event.detail["chunk"] == victim.hash
    # The bad file was moved aside, so the next snapshot of the same weights heals.
    assert not path.exists()
    assert list((store.chunks.root / "quarantine").iterdir())
    healed = write(store, tensors)
    assert read_back(store, healed) == b"".join(tensors)


def test_pager_reads_itself_and_reports_corruption(store: SnapshotStore) -> None:
    snapshot_id = write(store, weights())
    with store.reading(snapshot_id) as contents:
        ref = contents.chunks[0]
        buf = bytearray(ref.size)
        store.read_chunk_into(snapshot_id, ref, memoryview(buf))
    assert hash_bytes(buf) == ref.hash
    assert store.mark_corrupt(snapshot_id, "verify failed in the pager")
    assert not store.mark_corrupt(snapshot_id, "twice")
    assert store.chunks.path(ref.hash).exists()  # no hash given: nothing quarantined


@pytest.mark.parametrize("manifest", [{"x": float("nan")}, {"x": object()}, [1, 2]])
def test_manifest_must_be_a_json_object(store: SnapshotStore, manifest: object) -> None:
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=1) as w:
        w.add_tensor(b"z")
        with pytest.raises(InvalidArgument):
            w.commit(manifest)  # type: ignore[arg-type]
    assert store.list() == ()


def test_commit_twice_is_refused(store: SnapshotStore) -> None:
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=1) as w:
        w.commit({})
        with pytest.raises(FailedPrecondition):
            w.commit({})


@pytest.mark.parametrize(
    ("model", "fingerprint", "reserve", "error"),
    [
        ("../etc", FINGERPRINT, 0, InvalidArgument),
        (MODEL, "", 0, InvalidArgument),
        (MODEL, "x\n", 0, InvalidArgument),
        (MODEL, FINGERPRINT, -1, InvalidArgument),
        ("unregistered", FINGERPRINT, 0, NotFound),
    ],
)
def test_begin_validates(
    store: SnapshotStore, model: str, fingerprint: str, reserve: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        store.begin(model, fingerprint, reserve_bytes=reserve)
    assert store.usage().reserved_bytes == 0
    assert list(store.locks.writers_dir.iterdir()) == []


@pytest.mark.parametrize("bad_id", ["../x", "A" * 32, "", "g"])
def test_snapshot_ids_are_checked(store: SnapshotStore, bad_id: str) -> None:
    with pytest.raises(InvalidArgument):
        store.get(bad_id)
    with pytest.raises(InvalidArgument):
        store.delete(bad_id)


def test_delete_keeps_shared_chunks(store: SnapshotStore) -> None:
    base = weights()
    first = write(store, base)
    tuned = [*base[:3], blob("other", 99)]
    second = write(store, tuned)
    report = store.delete(first)
    assert (report.chunks_removed, report.bytes_freed) == (1, len(base[3]))
    assert read_back(store, second) == b"".join(tuned)
    with pytest.raises(NotFound):
        store.get(first)


def test_a_snapshot_being_read_cannot_be_deleted(store: SnapshotStore) -> None:
    snapshot_id = write(store, weights())
    with store.reading(snapshot_id):
        with pytest.raises(FailedPrecondition) as err:
            store.delete(snapshot_id)
        assert err.value.reason == "SNAPSHOT_IN_USE"
    store.delete(snapshot_id)


def test_a_snapshot_being_written_cannot_be_deleted(store: SnapshotStore) -> None:
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=1) as w:
        with pytest.raises(FailedPrecondition) as err:
            store.delete(w.id)
        assert err.value.reason == "SNAPSHOT_WRITING"
        w.commit({})


def test_touch(store: SnapshotStore, clock: FakeClock) -> None:
    snapshot_id = write(store, weights())
    clock.advance(100)
    store.touch(snapshot_id)
    assert store.get(snapshot_id).last_used_at == clock.now


def test_concurrent_writers_keep_refcounts_exact(store: SnapshotStore, catalog: Catalog) -> None:
    shared = weights("shared")
    errors: list[BaseException] = []
    ids: list[str] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            snapshot_id = write(store, [*shared, blob(f"own:{n}", 1000 + n)])
            with lock:
                ids.append(snapshot_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.scrub().refcounts_repaired == 0
    assert store.usage().used_bytes == sum(map(len, shared)) + sum(1000 + n for n in range(4))
    for snapshot_id in ids:
        assert read_back(store, snapshot_id).startswith(b"".join(shared))


def test_snapshots_of_another_host_are_listed_but_not_read(
    catalog: Catalog, make_store: StoreFactory, tmp_path: Path
) -> None:
    here = make_store()
    there = make_store(root=tmp_path / "other-host")
    remote = write(there, weights())
    assert here.list() == ()
    assert [s.id for s in here.list(all_stores=True)] == [remote]
    with pytest.raises(FailedPrecondition) as err, here.reading(remote):
        pass
    assert err.value.reason == "SNAPSHOT_NOT_LOCAL"
    here.scrub()  # must not touch the other host's rows
    assert there.get(remote).state is SnapshotState.COMPLETE
    assert read_back(there, remote) == b"".join(weights())
