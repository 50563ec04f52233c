"""Scrub reconciles the chunk files with the catalog, and never touches live work."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update

from tests.store.helpers import FINGERPRINT, MODEL, StoreFactory, blob, read_all
from torpor.store.catalog import Catalog
from torpor.store.schema import ChunkRow, SnapshotState
from torpor.store.snapshots import SnapshotStore


def write(store: SnapshotStore, *tensors: bytes) -> str:
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=sum(map(len, tensors))) as w:
        for t in tensors:
            w.add_tensor(t)
        return w.commit({}).id


def test_open_removes_orphans_and_temp_files(make_store: StoreFactory) -> None:
    store = make_store()
    kept = write(store, blob("kept", 5000))
    orphan = store.chunks.put(blob("orphan", 3000))  # a writer died before the catalog row
    temp = store.chunks.path(orphan.hash).parent / f".tmp-{orphan.hash}-999-abcd"
    temp.write_bytes(b"half a chunk")
    reopened = make_store()  # opening scrubs
    assert not store.chunks.path(orphan.hash).exists()
    assert not temp.exists()
    assert b"".join(read_all(reopened, kept)) == blob("kept", 5000)
    report = reopened.scrub()
    assert (report.orphan_files_removed, report.temp_files_removed) == (0, 0)


def test_a_live_writer_is_left_alone(store: SnapshotStore) -> None:
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=4000) as w:
        refs = w.add_tensor(blob("live", 4000))
        report = store.scrub()
        assert report.dead_writers_removed == 0 and report.orphan_files_removed == 0
        assert store.chunks.path(refs[0].hash).exists()
        assert store.usage().used_bytes == 4000
        info = w.commit({})
    assert b"".join(read_all(store, info.id)) == blob("live", 4000)


def test_missing_chunk_file_marks_its_snapshots_corrupt(
    store: SnapshotStore, catalog: Catalog
) -> None:
    shared = blob("shared", 2000)
    a = write(store, shared, blob("a", 100))
    b = write(store, shared, blob("b", 100))
    c = write(store, blob("c", 100))
    with store.reading(a) as contents:
        store.chunks.path(contents.chunks[0].hash).unlink()
    report = store.scrub()
    assert set(report.snapshots_marked_corrupt) == {a, b}
    assert store.get(a).state is SnapshotState.CORRUPT
    assert store.get(c).state is SnapshotState.COMPLETE
    assert {e.detail["snapshot"] for e in catalog.events_after(0)} == {a, b}


def test_a_wrong_sized_file_is_corrupt_and_quarantined(store: SnapshotStore) -> None:
    a = write(store, blob("a", 3000))
    with store.reading(a) as contents:
        path = store.chunks.path(contents.chunks[0].hash)
    path.write_bytes(b"short")
    assert store.scrub().snapshots_marked_corrupt == (a,)
    assert not path.exists()
    assert len(list((store.chunks.root / "quarantine").iterdir())) == 1


def test_deep_scrub_rehashes_every_chunk(store: SnapshotStore) -> None:
    a = write(store, blob("a", 3000))
    with store.reading(a) as contents:
        path = store.chunks.path(contents.chunks[0].hash)
    damaged = bytearray(path.read_bytes())
    damaged[7] ^= 0x80
    path.write_bytes(damaged)
    assert store.scrub().snapshots_marked_corrupt == ()  # sizes match: only deep finds it
    assert store.scrub(deep=True).snapshots_marked_corrupt == (a,)


def test_refcount_drift_is_repaired(store: SnapshotStore) -> None:
    write(store, blob("a", 100), blob("a", 100))
    with store.catalog.session() as s:
        s.execute(update(ChunkRow).values(refcount=7))
    assert store.scrub().refcounts_repaired == 1
    assert store.scrub().refcounts_repaired == 0
    with store.catalog.session(write=False) as s:
        assert [r.refcount for r in s.query(ChunkRow)] == [2]


def test_stray_files_are_reported_not_deleted(store: SnapshotStore) -> None:
    stray = store.chunks.chunk_dir / "notes.txt"
    stray.write_text("an operator's file")
    assert store.scrub().stray_files == (stray,)
    assert stray.exists()


def test_stale_lock_files_are_removed(store: SnapshotStore) -> None:
    a = write(store, blob("a", 10))
    with store.reading(a):
        pass
    dead_writer = store.locks.writers_dir / ("f" * 32 + ".lock")
    dead_writer.touch()
    gone_reader = store.locks.readers_dir / ("e" * 32 + ".lock")
    gone_reader.touch()
    store.scrub()
    assert not dead_writer.exists() and not gone_reader.exists()
    assert store.locks.reader_path(a).exists()  # its snapshot still exists


def test_collect_garbage_removes_only_unreferenced(store: SnapshotStore, tmp_path: Path) -> None:
    a = write(store, blob("a", 100))
    with store.catalog.session() as s:
        s.add(ChunkRow(store_id=store.store_id, hash="0" * 32, size=5, refcount=0))
    assert store.collect_garbage().chunks_removed == 1
    assert b"".join(read_all(store, a)) == blob("a", 100)
