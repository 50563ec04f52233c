"""A full disk under a real torpord (CPU backend): the chunk store, the catalog's directory
and the runtime directory each on a small tmpfs that the test fills (issue 12, "Disk full").

Each case must end in a clean error and an event, with the runtime left as it was.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from torpor.errors import ResourceExhausted, TorporError
from torpor.v1 import admin_pb2, common_pb2

from ..faults.fullfs import fill, small_tmpfs
from ..helpers import assert_eventually
from .conftest import Torpord, call, footprint_bytes, start_torpord

PROMPT = [5, 4, 3, 2]


def _tokens(chunks: list[common_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _events(daemon: Torpord, kind: int) -> list[admin_pb2.Event]:
    request = admin_pb2.WatchEventsRequest(after_id=0, kinds=[kind])
    return list(call(daemon.admin.WatchEvents, request))


def _evict(daemon: Torpord, model: str, tier: int) -> admin_pb2.EvictResponse:
    return call(daemon.admin.Evict, admin_pb2.EvictRequest(model=model, to_tier=tier))


def _chunk_files(store: Path) -> list[Path]:
    """Every file under the chunk directory: chunks, temp files, orphans."""
    return sorted(p for p in (store / "chunks").rglob("*") if p.is_file())


def _start(tmp_path: Path, model_root: Path, models: tuple[str, ...], **env: str) -> Torpord:
    daemon = start_torpord(
        tmp_path / "state", model_root, memory=int(2.5 * footprint_bytes(model_root)), **env
    )
    for name in models:
        daemon.register(name, model_root / name)
    return daemon


def test_snapshot_write_hitting_enospc_leaves_the_runtime_resident(
    tmp_path: Path, model_root: Path
) -> None:
    """Evict to disk while the chunk store's file system has room for part of the snapshot:
    RESOURCE_EXHAUSTED, a snapshot_failed event, no file left behind, and the same worker
    serves the same tokens; once there is room, the same eviction works."""
    with small_tmpfs(tmp_path / "snapshots", 32 << 20) as store:
        daemon = _start(tmp_path, model_root, ("alpha",), TORPOR_STORE_SNAPSHOT_DIR=str(store))
        try:
            before = _tokens(daemon.generate("alpha", PROMPT))
            pid = daemon.runtime("alpha").worker_pid
            filler = fill(store, leave=2 << 20)  # room for the first chunks, not for all
            with pytest.raises(ResourceExhausted) as err:
                _evict(daemon, "alpha", common_pb2.TIER_DISK)
            assert err.value.reason == "STORE_FULL", err.value
            runtime = daemon.runtime("alpha")
            assert runtime.state == common_pb2.RUNTIME_STATE_RESIDENT
            assert runtime.worker_pid == pid
            assert _tokens(daemon.generate("alpha", PROMPT)) == before
            assert daemon.runtime("alpha").worker_pid == pid
            failed = assert_eventually(
                lambda: _events(daemon, admin_pb2.EVENT_KIND_SNAPSHOT_FAILED), bool
            )
            assert failed[0].model == "alpha"
            assert failed[0].attributes["reason"] == "STORE_FULL"
            # The chunks it wrote before the disk filled up are cleaned while it runs.
            assert_eventually(lambda: _chunk_files(store), lambda files: files == [])
            filler.unlink()
            _evict(daemon, "alpha", common_pb2.TIER_DISK)
            assert daemon.runtime("alpha").state == common_pb2.RUNTIME_STATE_SUSPENDED_DISK
            assert _tokens(daemon.generate("alpha", PROMPT)) == before
        finally:
            assert daemon.stop() == 0


def test_leftovers_of_killed_writes_are_swept_while_torpord_runs(
    tmp_path: Path, model_root: Path
) -> None:
    """An orphan chunk and a temp file (what a worker killed mid-write leaves) disappear
    without a restart; the chunks of a recorded snapshot stay and still restore."""
    daemon = _start(tmp_path, model_root, ("alpha",), TORPOR_STORE_SWEEP_INTERVAL_S="0.5")
    try:
        before = _tokens(daemon.generate("alpha", PROMPT))
        _evict(daemon, "alpha", common_pb2.TIER_DISK)
        store = tmp_path / "state" / "snapshots"
        recorded = _chunk_files(store)
        orphan = store / "chunks" / "ab" / "cd" / ("abcd" + "0" * 28)
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"o" * 4096)
        temp = orphan.parent / f".tmp-{'ef' * 16}-{2**22 + 1}-beef"  # its writer is gone
        temp.write_bytes(b"t" * 1024)
        assert_eventually(lambda: _chunk_files(store), lambda files: files == recorded)
        assert _tokens(daemon.generate("alpha", PROMPT)) == before
    finally:
        assert daemon.stop() == 0


def _truncate_wal(catalog: Path) -> None:
    """Checkpoint the WAL into the database and cut it to zero bytes, so that the next
    commit must grow a file (on a full disk: SQLITE_FULL)."""
    with sqlite3.connect(catalog, timeout=30) as db:
        assert_eventually(
            lambda: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone(),
            lambda row: row[0] == 0,
        )
    db.close()


def test_host_resume_with_a_full_catalog_disk_is_not_a_cold_reload(
    tmp_path: Path, model_root: Path
) -> None:
    """The state directory (catalog.db) on a full tmpfs: a host resume still serves from the
    same worker; the bandwidth sample and events that cannot be written are only logged."""
    with small_tmpfs(tmp_path / "state", 64 << 20):
        daemon = _start(tmp_path, model_root, ("alpha", "beta", "gamma"))
        try:
            before = _tokens(daemon.generate("alpha", PROMPT))
            daemon.generate("beta", PROMPT)
            daemon.generate("gamma", PROMPT)  # two fit: alpha goes down to host RAM
            assert daemon.runtime("alpha").state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
            pid = daemon.runtime("alpha").worker_pid
            _truncate_wal(tmp_path / "state" / "catalog.db")
            filler = fill(tmp_path / "state")
            chunks = daemon.generate("alpha", PROMPT)
            assert chunks[-1].usage.restored_from == common_pb2.TIER_HOST
            assert _tokens(chunks) == before
            assert daemon.runtime("alpha").worker_pid == pid
            filler.unlink()
        finally:
            assert daemon.stop() == 0


def test_snapshot_record_refused_by_a_full_catalog_leaves_the_runtime_resident(
    tmp_path: Path, model_root: Path
) -> None:
    """The chunk store has room but the catalog's disk is full: torpord cannot reserve the
    room (it does so before the worker writes), or record the chunks; the eviction fails
    cleanly, the worker lives, and no chunk is left."""
    store = tmp_path / "snapshots"
    with small_tmpfs(tmp_path / "state", 64 << 20):
        daemon = _start(tmp_path, model_root, ("alpha",), TORPOR_STORE_SNAPSHOT_DIR=str(store))
        try:
            before = _tokens(daemon.generate("alpha", PROMPT))
            pid = daemon.runtime("alpha").worker_pid
            _truncate_wal(tmp_path / "state" / "catalog.db")
            filler = fill(tmp_path / "state")
            with pytest.raises(TorporError) as err:
                _evict(daemon, "alpha", common_pb2.TIER_DISK)
            assert err.value.reason == "CATALOG_UNAVAILABLE", err.value
            runtime = daemon.runtime("alpha")
            assert (runtime.state, runtime.worker_pid) == (common_pb2.RUNTIME_STATE_RESIDENT, pid)
            assert _tokens(daemon.generate("alpha", PROMPT)) == before
            assert_eventually(lambda: _chunk_files(store), lambda files: files == [])
            filler.unlink()
        finally:
            assert daemon.stop() == 0


def test_full_runtime_dir_fails_the_load_cleanly(tmp_path: Path, model_root: Path) -> None:
    """The worker record cannot be written: the load fails with a clear error in bounded
    time, the spawned worker is stopped, the model is not left LOADING, and it loads once
    there is room again."""
    with small_tmpfs(tmp_path / "run", 1 << 20) as run:
        daemon = _start(tmp_path, model_root, ("alpha",), TORPOR_DAEMON_RUNTIME_DIR=str(run))
        try:
            filler = fill(run)
            start = time.monotonic()
            with pytest.raises(TorporError) as err:
                daemon.generate("alpha", PROMPT)
            assert time.monotonic() - start < 60
            assert err.value.code.name in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"), err.value
            assert "runtime directory" in err.value.message or "full" in err.value.message
            assert_eventually(
                lambda: daemon.runtime("alpha").state,
                lambda s: s not in (common_pb2.RUNTIME_STATE_LOADING,),
            )
            assert daemon.runtime("alpha").worker_pid == 0
            failed = [
                e
                for e in _events(daemon, admin_pb2.EVENT_KIND_STATE_CHANGED)
                if e.attributes["to"] == "failed"
            ]
            assert failed and "runtime directory is full" in failed[-1].attributes["why"]
            filler.unlink()
            assert len(_tokens(daemon.generate("alpha", PROMPT))) == 8
        finally:
            assert daemon.stop() == 0
