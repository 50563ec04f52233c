"""The disk budget has one owner (issue 13), checked on a real torpord (CPU backend) against
the real chunk store: the core counts each snapshot at the bytes the store holds for it and
the chunk bytes on disk never exceed its count; every restore from disk moves its snapshot up
the store's LRU order; and room is reserved before a worker writes, so a full store writes
no chunk."""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from pathlib import Path

import pytest

from torpor.errors import FailedPrecondition, ResourceExhausted
from torpor.store.catalog import Catalog
from torpor.store.snapshots import SnapshotStore
from torpor.store.store_config import CatalogConfig, SnapshotStoreConfig
from torpor.v1 import admin_pb2, common_pb2

from ..helpers import assert_eventually
from .conftest import Torpord, call, footprint_bytes, start_torpord

PROMPT = [5, 4, 3, 2]
CAPACITY = 64 << 20


def _start(tmp_path: Path, model_root: Path, models: tuple[str, ...]) -> Torpord:
    daemon = start_torpord(
        tmp_path / "state",
        model_root,
        memory=int(2.5 * footprint_bytes(model_root)),
        TORPOR_STORE_CAPACITY=str(CAPACITY),
    )
    for name in models:
        daemon.register(name, model_root / name)
    return daemon


def _evict(daemon: Torpord, model: str, tier: int) -> admin_pb2.EvictResponse:
    return call(daemon.admin.Evict, admin_pb2.EvictRequest(model=model, to_tier=tier))


def _snapshots(daemon: Torpord) -> dict[str, admin_pb2.SnapshotInfo]:
    reply = call(daemon.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest())
    return {s.model: s for s in reply.snapshots}


def _chunk_bytes(daemon: Torpord) -> int:
    chunks = daemon.state_dir / "snapshots" / "chunks"
    return sum(p.stat().st_size for p in chunks.rglob("*") if p.is_file())


def test_the_disk_ledger_counts_what_the_store_holds(tmp_path: Path, model_root: Path) -> None:
    """After a disk eviction the core counts the snapshot at the bytes the store recorded
    for it (weights, small files and manifest), not the weights alone, and the chunk bytes
    on disk are within that count."""
    daemon = _start(tmp_path, model_root, ("alpha",))
    try:
        daemon.generate("alpha", PROMPT)
        _evict(daemon, "alpha", common_pb2.TIER_DISK)
        snapshot = _snapshots(daemon)["alpha"]
        ledger = daemon.residency().disk.used_bytes
        assert ledger == snapshot.bytes
        assert 0 < _chunk_bytes(daemon) <= ledger
    finally:
        assert daemon.stop() == 0


def test_a_restore_from_disk_moves_its_snapshot_up_the_lru(
    tmp_path: Path, model_root: Path
) -> None:
    """alpha's snapshot is older than beta's; resuming alpha from disk makes it the most
    recently used, so the store's eviction would take beta's first (LRU follows use, not
    creation)."""
    daemon = _start(tmp_path, model_root, ("alpha", "beta"))
    try:
        for name in ("alpha", "beta"):
            daemon.generate(name, PROMPT)
            _evict(daemon, name, common_pb2.TIER_DISK)
        before = _snapshots(daemon)
        assert before["alpha"].last_used.ToDatetime() <= before["beta"].last_used.ToDatetime()
        chunks = daemon.generate("alpha", PROMPT)
        assert chunks[-1].usage.restored_from == common_pb2.TIER_DISK
        after = _snapshots(daemon)
        assert after["alpha"].last_used.ToDatetime() > after["beta"].last_used.ToDatetime()
    finally:
        assert daemon.stop() == 0


def _read_locked(lock: Path) -> bool:
    """Does someone hold this snapshot's reader lock (shared) now?"""
    if not lock.exists():
        return False
    with lock.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_snapshot_cannot_be_deleted_under_a_running_resume(
    tmp_path: Path, model_root: Path
) -> None:
    """torpord holds the store's read lock on the snapshot for the whole resume from disk:
    a deletion asked meanwhile (here by another process on the same store) is refused with
    SNAPSHOT_IN_USE, and the resume serves the same tokens. The test keeps the resume
    inside its window by holding the catalog's write lock, which the resume's `touch`
    waits for."""
    daemon = _start(tmp_path, model_root, ("alpha",))
    catalog = Catalog.open(CatalogConfig.in_state_dir(tmp_path / "state"))
    root = tmp_path / "state" / "snapshots"
    store = SnapshotStore.open(
        catalog, SnapshotStoreConfig(root=root, capacity_bytes=CAPACITY), run_scrub=False
    )
    try:
        before = daemon.generate("alpha", PROMPT)
        _evict(daemon, "alpha", common_pb2.TIER_DISK)
        snapshot = _snapshots(daemon)["alpha"].snapshot_id
        db = sqlite3.connect(tmp_path / "state" / "catalog.db", isolation_level=None, timeout=30)
        db.execute("BEGIN IMMEDIATE")  # the resume's touch waits behind this
        result: list[object] = []
        resume = threading.Thread(target=lambda: result.append(daemon.generate("alpha", PROMPT)))
        resume.start()
        try:
            assert_eventually(lambda: _read_locked(store.locks.reader_path(snapshot)), bool)
            with pytest.raises(FailedPrecondition) as err:
                store.delete(snapshot)
            assert err.value.reason == "SNAPSHOT_IN_USE"
        finally:
            db.execute("ROLLBACK")
            db.close()
            resume.join(timeout=120)
        [chunks] = result
        assert chunks[-1].usage.restored_from == common_pb2.TIER_DISK  # type: ignore[index]
        assert [t for c in chunks for t in c.token_ids] == [  # type: ignore[attr-defined]
            t for c in before for t in c.token_ids
        ]
        assert _snapshots(daemon)["alpha"].snapshot_id == snapshot
    finally:
        catalog.close()
        assert daemon.stop() == 0


def test_a_full_store_is_refused_before_any_chunk_is_written(
    tmp_path: Path, model_root: Path
) -> None:
    """Another writer holds the store's whole budget: the disk eviction is refused at the
    reservation (RESOURCE_EXHAUSTED, STORE_FULL, a snapshot_failed event), the runtime is
    untouched in the same worker, and no chunk (not even a chunk directory) was written;
    once the room is back the same eviction works."""
    daemon = _start(tmp_path, model_root, ("alpha",))
    catalog = Catalog.open(CatalogConfig.in_state_dir(tmp_path / "state"))
    store = SnapshotStore.open(
        catalog,
        SnapshotStoreConfig(root=tmp_path / "state" / "snapshots", capacity_bytes=CAPACITY),
        run_scrub=False,
    )
    try:
        daemon.generate("alpha", PROMPT)
        pid = daemon.runtime("alpha").worker_pid
        with store.begin("alpha", "another-tool", reserve_bytes=CAPACITY - 4096) as other:
            with pytest.raises(ResourceExhausted) as err:
                _evict(daemon, "alpha", common_pb2.TIER_DISK)
            assert err.value.reason == "STORE_FULL", err.value
            runtime = daemon.runtime("alpha")
            assert (runtime.state, runtime.worker_pid) == (common_pb2.RUNTIME_STATE_RESIDENT, pid)
            chunks = tmp_path / "state" / "snapshots" / "chunks"
            assert not chunks.exists() or list(chunks.iterdir()) == []
            request = admin_pb2.WatchEventsRequest(
                after_id=0, kinds=[admin_pb2.EVENT_KIND_SNAPSHOT_FAILED]
            )
            failed = assert_eventually(lambda: list(call(daemon.admin.WatchEvents, request)), bool)
            assert failed[0].attributes["reason"] == "STORE_FULL"
            other.abort()
        _evict(daemon, "alpha", common_pb2.TIER_DISK)
        assert daemon.runtime("alpha").state == common_pb2.RUNTIME_STATE_SUSPENDED_DISK
    finally:
        catalog.close()
        assert daemon.stop() == 0
