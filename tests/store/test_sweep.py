"""Failed and killed writes while the store is in use (issue 12, "Disk full"): the running
sweep removes their temp and orphan files, the budget counts them until then, and a write
that hits a full file system aborts without leaving a file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.fullfs import fill, small_tmpfs
from tests.store.helpers import FINGERPRINT, MODEL, StoreFactory, blob, read_all
from torpor.errors import ResourceExhausted
from torpor.store.scrub import _writer_alive
from torpor.store.snapshots import SnapshotStore


def _files(store: SnapshotStore) -> list[Path]:
    return sorted(p for p in store.chunks.chunk_dir.rglob("*") if p.is_file())


def _leftovers(store: SnapshotStore, pid: int) -> tuple[Path, Path]:
    """An orphan chunk (file, no row: a worker killed before torpord recorded it) and the
    temp file of a write by process `pid`."""
    orphan = store.chunks.put(blob("orphan", 3000))
    temp = store.chunks.path(orphan.hash).parent / f".tmp-{'0' * 32}-{pid}-abcd"
    temp.write_bytes(b"x" * 1000)
    return store.chunks.path(orphan.hash), temp


def test_sweep_removes_temp_and_orphan_files_while_running(make_store: StoreFactory) -> None:
    store = make_store()
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=2000) as w:
        w.add_tensor(blob("kept", 2000))
        kept = w.commit({})
    orphan, temp = _leftovers(store, pid=2**22 + 1)  # above pid_max: a writer that is gone
    report = store.sweep()
    assert (report.orphan_files_removed, report.temp_files_removed) == (1, 1)
    assert report.bytes_removed == 4000 and report.untracked_bytes == 0
    assert not orphan.exists() and not temp.exists()
    assert b"".join(read_all(store, kept.id)) == blob("kept", 2000)  # referenced: untouched
    assert store.sweep().orphan_files_removed == 0


def test_sweep_keeps_a_live_writers_temp_file_and_young_orphans(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    orphan, temp = _leftovers(store, pid=os.getpid())
    report = store.sweep(min_age_s=3600)
    assert orphan.exists() and temp.exists()
    assert report.untracked_bytes == 4000
    assert store.usage().untracked_bytes == 4000


def test_untracked_files_count_against_the_budget_until_swept(make_store: StoreFactory) -> None:
    store = make_store(capacity=5000)
    orphan, temp = _leftovers(store, pid=os.getpid())
    store.sweep(min_age_s=3600)  # measured, not removed: 4000 of 5000 bytes taken
    assert store.usage().free_bytes == 1000
    with pytest.raises(ResourceExhausted) as err:
        store.begin(MODEL, FINGERPRINT, reserve_bytes=2000)
    assert err.value.reason == "STORE_FULL"
    assert err.value.metadata["untracked_bytes"] == "4000"
    temp.unlink()  # the live writer finished
    store.sweep()
    assert store.usage().free_bytes == 5000
    with store.begin(MODEL, FINGERPRINT, reserve_bytes=2000) as w:
        w.add_tensor(blob("fits", 2000))
        w.commit({})
    assert not orphan.exists()


def test_write_on_a_full_file_system_aborts_without_leftovers(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    """ENOSPC in the middle of a snapshot: ResourceExhausted (STORE_FULL), and the chunks it
    had written, its temp file and its reservation are all gone."""
    with small_tmpfs(tmp_path / "disk", 1 << 20) as disk:
        store = make_store(root=disk / "store")
        fill(disk, leave=160 << 10)
        writer = store.begin(MODEL, FINGERPRINT, reserve_bytes=4 * (64 << 10))
        with pytest.raises(ResourceExhausted) as err, writer as w:
            for i in range(4):
                w.add_tensor(blob(f"t{i}", 64 << 10))
        assert err.value.reason == "STORE_FULL"
        assert _files(store) == []
        usage = store.usage()
        assert (usage.used_bytes, usage.reserved_bytes, usage.untracked_bytes) == (0, 0, 0)
        assert store.list(MODEL) == ()


def _zombie() -> int:
    """A child that has exited and is not reaped yet: `kill(pid, 0)` still succeeds on it."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # until it has exited; still unreaped
    return pid


def test_a_zombie_writer_is_dead_and_its_temp_file_is_swept(make_store: StoreFactory) -> None:
    """A worker killed mid-write is a zombie until torpord reaps it, and the sweep that
    follows the failed write runs in that window: its temp file must go then, not at the
    next periodic sweep (issue 12, found by the fault suite's suspend_disk-worker case)."""
    store = make_store()
    pid = _zombie()
    try:
        _, temp = _leftovers(store, pid=pid)
        assert not _writer_alive(temp)
        assert store.sweep(min_age_s=3600).temp_files_removed == 1
        assert not temp.exists()
    finally:
        os.waitpid(pid, 0)


def test_a_live_writer_is_alive() -> None:
    assert _writer_alive(Path(f".tmp-{'0' * 32}-{os.getpid()}-abcd"))
    assert not _writer_alive(Path(f".tmp-{'0' * 32}-{2**22 + 1}-abcd"))  # above pid_max
