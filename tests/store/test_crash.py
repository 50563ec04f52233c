"""A writer killed with SIGKILL at random points never leaves a visible partial snapshot.

Each trial starts a real writer process that writes several snapshots and reports every
step on a pipe; the test kills it after a random number of steps, reopens the store (which
scrubs it) and checks everything: no WRITING snapshot, no temp or orphan file, exact
refcounts, and every complete snapshot (from this trial and all earlier ones) bit-identical.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.store.helpers import MODEL, LineReader, crash_snapshot_tensors, read_all
from torpor.store.catalog import Catalog
from torpor.store.schema import ChunkRow, SnapshotChunkRow, SnapshotRow, SnapshotState
from torpor.store.snapshots import SnapshotStore
from torpor.store.store_config import CatalogConfig, SnapshotStoreConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_MODULE = "tests.store.writer_child"
TRIALS = 20
SNAPSHOTS_PER_TRIAL = 3
STEPS_PER_SNAPSHOT = 2 + len(crash_snapshot_tensors(0, 0))  # begun, tensors, committed


def start_writer(url: str, root: Path, trial: int, mode: str = "write") -> subprocess.Popen[bytes]:
    args = [url, str(root), str(trial), str(SNAPSHOTS_PER_TRIAL), mode]
    return subprocess.Popen(
        [sys.executable, "-m", CHILD_MODULE, *args], stdout=subprocess.PIPE, cwd=REPO_ROOT
    )


def run_and_kill(url: str, root: Path, trial: int, kill_after: int, delay_s: float) -> set[str]:
    """Run a writer and SIGKILL it `delay_s` after its `kill_after`-th step (or when it
    exits, if sooner); returns the ids it reported committed.

    The handshake picks the step; the random delay picks the point inside the next step
    (hashing, file write, fsync, rename, catalog commit).
    """
    proc = start_writer(url, root, trial)
    reader = LineReader(proc)
    committed: set[str] = set()
    try:
        assert reader.readline() == "ready"
        for _ in range(kill_after):
            line = reader.readline()
            if line is None or line == "done":
                break
            if line.startswith("committed "):
                committed.add(line.split()[1])
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=delay_s)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()
    return committed


def check_consistent(store: SnapshotStore, must_exist: set[str]) -> None:
    """Everything the crash test promises, after a reopen and scrub."""
    with store.catalog.session(write=False) as s:
        states = dict(s.execute(select(SnapshotRow.id, SnapshotRow.state)).all())
        refs = dict(s.execute(select(ChunkRow.hash, ChunkRow.refcount)).all())
        members = dict(
            s.execute(
                select(SnapshotChunkRow.hash, func.count()).group_by(SnapshotChunkRow.hash)
            ).all()
        )
    assert set(states.values()) <= {SnapshotState.COMPLETE}, states
    assert must_exist <= set(states)
    assert refs == members  # refcounts exact, no unreferenced chunk rows left
    scan = store.chunks.scan()
    assert scan.temps == () and scan.strays == ()
    assert {c.hash for c in scan.chunks} == set(refs)  # no orphan files, no missing ones
    assert list(store.locks.writers_dir.iterdir()) == []
    for snapshot_id in states:
        with store.reading(snapshot_id) as contents:
            trial, k = contents.manifest["trial"], contents.manifest["k"]
        actual = hashlib.sha256()
        for data in read_all(store, snapshot_id):
            actual.update(data)
        assert actual.digest() == expected_digest(trial, k), (trial, k)


@functools.cache
def expected_digest(trial: int, k: int) -> bytes:
    """SHA-256 of what snapshot `k` of `trial` must read back as (computed once)."""
    return hashlib.sha256(b"".join(crash_snapshot_tensors(trial, k))).digest()


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_no_partial_snapshot(
    db_url: str, registered: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("TORPOR_CRASH_SEED", "20261128"))
    rng = random.Random(seed)
    root = tmp_path / "store"
    config = SnapshotStoreConfig(root=root, capacity_bytes=1 << 30, max_chunk_bytes=256 * 1024)
    survivors: set[str] = set()
    steps = SNAPSHOTS_PER_TRIAL * STEPS_PER_SNAPSHOT
    kills = [rng.randrange(0, steps + 1) for _ in range(TRIALS)]
    for trial, kill_after in enumerate(kills):
        survivors |= run_and_kill(db_url, root, trial, kill_after, rng.uniform(0, 0.02))
        with Catalog.open(CatalogConfig(url=db_url)) as catalog:
            store = SnapshotStore.open(catalog, config)  # scrubs
            try:
                check_consistent(store, survivors)
            except AssertionError as exc:
                raise AssertionError(
                    f"trial {trial} (kill after {kill_after}, seed {seed})"
                ) from exc
    assert survivors, f"no snapshot was ever committed (kill points {kills})"
    assert min(kills) < steps, "every writer finished: the kills hit nothing"


def test_a_writer_that_exits_without_aborting_is_reaped(
    db_url: str, store: SnapshotStore, tmp_path: Path
) -> None:
    proc = start_writer(db_url, store.chunks.root, 0, mode="exit-while-writing")
    reader = LineReader(proc)
    assert reader.readline() == "ready"
    line = reader.readline()
    assert line is not None and line.startswith("begun ")
    assert proc.wait(timeout=60) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    assert store.usage().reserved_bytes == 0 and store.usage().used_bytes == 1000
    report = store.scrub()
    assert report.dead_writers_removed == 1
    assert report.unreferenced_chunks_removed == 1
    assert store.usage().used_bytes == 0
    assert store.chunks.scan().chunks == ()
    assert list(store.locks.writers_dir.iterdir()) == []
    assert store.catalog.get_model(MODEL).spec.name == MODEL
