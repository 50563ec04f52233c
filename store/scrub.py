"""Scrub: reconcile the chunk files of one host with the catalog (run at start-up), and the
light `sweep` that the daemon runs while it serves.

In order:
1. Snapshots left in WRITING by a dead writer (its writer lock is free) are deleted.
2. Under the store lock held exclusive (no chunk write in flight):
   temp files are removed; chunk refcounts are recomputed from the membership rows;
   unreferenced chunks are collected; chunk files with no catalog row (a writer died
   between the file and the row) are removed; complete snapshots that reference a
   missing or wrong-sized file (or, with `deep`, a file failing its hash) become CORRUPT.
3. Lock files of writers and readers that are gone are removed.

`sweep` is the part that is safe and cheap while the daemon serves (issue 12): dead writers'
WRITING rows, temp files whose writing process is gone, and chunk files no catalog row
references (older than `min_age_s`). It walks the directory but reads no chunk. Chunks a
worker has written but torpord has not yet recorded are orphans too, so the daemon sweeps
only while none of its snapshot writes is in flight (`torpor.scheduler.recorder`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update

from torpor.errors import DataLoss
from torpor.log import get_logger
from torpor.store import capacity, rows
from torpor.store.chunks import ChunkRef
from torpor.store.records import ScrubReport, SweepReport
from torpor.store.schema import ChunkRow, SnapshotChunkRow, SnapshotRow, SnapshotState

if TYPE_CHECKING:
    from torpor.store.snapshots import SnapshotStore

log = get_logger("store.scrub")


def scrub(store: SnapshotStore, *, deep: bool = False) -> ScrubReport:
    """Reconcile files and catalog; see the module docstring. Safe while writers run."""
    dead = reap_dead_writers(store)
    with store.locks.exclusive():
        temps = _remove_temp_files(store)
        repaired = _repair_refcounts(store)
    collected = capacity.collect_garbage(store).chunks_removed
    with store.locks.exclusive():
        scan = store.chunks.scan()
        with store.catalog.session(write=False) as s:
            sizes = {h: r.size for h, r in rows.chunk_table(s, store.store_id).items()}
        orphans = [c for c in scan.chunks if c.hash not in sizes]
        for orphan in orphans:
            store.chunks.delete(orphan.hash)
        on_disk = {c.hash: c.size for c in scan.chunks}
        bad = {h for h, size in sizes.items() if on_disk.get(h) != size}
        if deep:
            bad |= _failing_hash(store, sizes, exclude=bad)
        corrupt = _mark_users_corrupt(store, bad)
        for digest in bad & on_disk.keys():  # present but damaged: keep it for inspection
            store.chunks.quarantine(ChunkRef(digest, sizes[digest]))
    _remove_stale_locks(store)
    store.untracked_bytes = 0  # every temp and orphan file is gone
    report = ScrubReport(
        dead_writers_removed=dead,
        temp_files_removed=temps,
        orphan_files_removed=len(orphans),
        unreferenced_chunks_removed=collected,
        snapshots_marked_corrupt=tuple(sorted(corrupt)),
        refcounts_repaired=repaired,
        stray_files=scan.strays,
    )
    log.info("store_scrubbed", store=store.store_id, deep=deep, **_summary(report))
    for stray in scan.strays:
        log.warning("stray_file_in_chunk_store", store=store.store_id, path=str(stray))
    return report


def sweep(store: SnapshotStore, *, min_age_s: float = 0.0) -> SweepReport:
    """Remove what failed or killed writes left while the store is in use: dead writers'
    rows, temp files of processes that are gone, and orphan chunk files older than
    `min_age_s`. What stays is counted in `store.untracked_bytes` (the budget sees it)."""
    dead = reap_dead_writers(store)
    now = time.time()
    removed_bytes = kept_bytes = temps = orphans = 0
    with store.locks.exclusive():  # no chunk is between a writer's dedup and its row
        scan = store.chunks.scan()
        with store.catalog.session(write=False) as s:
            known = set(rows.chunk_table(s, store.store_id))
        for path in scan.temps:
            size = _size(path)
            if _writer_alive(path):
                kept_bytes += size
            elif _unlink(path):
                temps, removed_bytes = temps + 1, removed_bytes + size
        for ref in scan.chunks:
            if ref.hash in known:
                continue
            if now - _mtime(store.chunks.path(ref.hash)) < min_age_s:
                kept_bytes += ref.size
            elif store.chunks.delete(ref.hash):
                orphans, removed_bytes = orphans + 1, removed_bytes + ref.size
        store.untracked_bytes = kept_bytes
    removed = temps + orphans
    report = SweepReport(dead, temps, orphans, removed_bytes, kept_bytes)
    if removed or dead:
        log.info(
            "store_swept",
            store=store.store_id,
            dead_writers=dead,
            temp_files=temps,
            orphan_files=orphans,
            bytes_removed=removed_bytes,
            untracked_bytes=kept_bytes,
        )
    return report


def _writer_alive(temp: Path) -> bool:
    """Whether the process named in a temp file's name (`.tmp-<hash>-<pid>-<rand>`) lives;
    a name without a pid is taken for a dead writer's."""
    try:
        pid = int(temp.name.split("-")[-2])
    except (IndexError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _exiting(pid)


PF_EXITING = 0x4
"""The kernel's flag (in /proc/PID/stat) of a process that has begun to exit."""


def _exiting(pid: int) -> bool:
    """Whether `pid` has exited but is not reaped yet (a zombie), or is exiting: it writes
    nothing more. `kill(pid, 0)` succeeds on such a process, and a worker killed mid-write
    is one until torpord reaps it, which is just when the sweep after its failed write runs
    (issue 12). The writers are single-process Python (the main thread lives as long as the
    process), so the state of the pid itself tells."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # reaped meanwhile (the next sweep has it), or no /proc: trust kill()
        return False
    # After the command name, which may hold spaces and parentheses: state, ppid, pgrp,
    # session, tty_nr, tpgid, flags.
    fields = text[text.rindex(")") + 1 :].split()
    return fields[0] in ("Z", "X", "x") or int(fields[6]) & PF_EXITING != 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def reap_dead_writers(store: SnapshotStore) -> int:
    """Delete this store's WRITING snapshots whose writer is dead; returns how many."""
    with store.catalog.session(write=False) as s:
        ids = list(
            s.scalars(
                select(SnapshotRow.id).where(
                    SnapshotRow.store_id == store.store_id,
                    SnapshotRow.state == SnapshotState.WRITING,
                )
            )
        )
    reaped = 0
    for snapshot_id in ids:
        if store.locks.writer_alive(snapshot_id):
            continue
        with store.catalog.session() as s:
            row = s.get(SnapshotRow, snapshot_id, with_for_update=True)
            # Re-checked in the transaction: the writer may have committed meanwhile.
            if row is not None and row.state == SnapshotState.WRITING:
                rows.delete_snapshot_rows(s, row)
                reaped += 1
                log.warning("dead_writer_reaped", snapshot=snapshot_id, model=row.model_name)
        store.locks.remove_writer(snapshot_id)
    return reaped


def _remove_temp_files(store: SnapshotStore) -> int:
    temps = list(store.chunks.scan().temps) + list(store.chunks.root.glob(".tmp-*"))
    for path in temps:
        path.unlink(missing_ok=True)
    return len(temps)


def _repair_refcounts(store: SnapshotStore) -> int:
    """Set every chunk's refcount to its membership count; returns how many were wrong."""
    with store.catalog.session() as s:
        counts = dict(
            s.execute(
                select(SnapshotChunkRow.hash, func.count())
                .where(SnapshotChunkRow.store_id == store.store_id)
                .group_by(SnapshotChunkRow.hash)
            ).all()
        )
        wrong = {
            h: int(counts.get(h, 0))
            for h, row in rows.chunk_table(s, store.store_id).items()
            if row.refcount != counts.get(h, 0)
        }
        for digest, count in wrong.items():
            s.execute(
                update(ChunkRow)
                .where(ChunkRow.store_id == store.store_id, ChunkRow.hash == digest)
                .values(refcount=count)
            )
    if wrong:
        log.warning("refcounts_repaired", store=store.store_id, chunks=len(wrong))
    return len(wrong)


def _failing_hash(store: SnapshotStore, sizes: dict[str, int], exclude: set[str]) -> set[str]:
    """Chunks whose file does not hash to its name (reads every byte)."""
    failing: set[str] = set()
    for digest, size in sizes.items():
        if digest in exclude:
            continue
        try:
            store.chunks.read(ChunkRef(digest, size))
        except DataLoss:
            failing.add(digest)
    return failing


def _mark_users_corrupt(store: SnapshotStore, bad: set[str]) -> set[str]:
    if not bad:
        return set()
    with store.catalog.session(write=False) as s:
        users = rows.snapshots_using(s, store.store_id, bad)
    changed: set[str] = set()
    for snapshot_id in sorted(users):
        if store.mark_corrupt(snapshot_id, "chunk file missing or damaged (scrub)"):
            changed.add(snapshot_id)
    return changed


def _remove_stale_locks(store: SnapshotStore) -> None:
    """Drop lock files whose writer is dead and whose snapshot is no longer WRITING, and
    reader lock files of snapshots that no longer exist."""
    with store.catalog.session(write=False) as s:
        live = {
            r.id: r.state
            for r in s.scalars(select(SnapshotRow).where(SnapshotRow.store_id == store.store_id))
        }
    for path in store.locks.writers_dir.glob("*.lock"):
        snapshot_id = path.stem
        if live.get(snapshot_id) != SnapshotState.WRITING and not _alive(store, snapshot_id):
            path.unlink(missing_ok=True)
    for path in store.locks.readers_dir.glob("*.lock"):
        if path.stem in live or not _hex(path.stem):
            continue
        claim = store.locks.try_claim_for_delete(path.stem)
        if claim is not None:
            claim.release(remove=True)


def _alive(store: SnapshotStore, snapshot_id: str) -> bool:
    return _hex(snapshot_id) and store.locks.writer_alive(snapshot_id)


def _hex(text: str) -> bool:
    return 0 < len(text) <= 32 and all(c in "0123456789abcdef" for c in text)


def _summary(report: ScrubReport) -> dict[str, object]:
    return {
        "dead_writers": report.dead_writers_removed,
        "temp_files": report.temp_files_removed,
        "orphan_files": report.orphan_files_removed,
        "unreferenced_chunks": report.unreferenced_chunks_removed,
        "marked_corrupt": len(report.snapshots_marked_corrupt),
        "refcounts_repaired": report.refcounts_repaired,
        "stray_files": len(report.stray_files),
    }
