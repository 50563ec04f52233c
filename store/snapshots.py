"""Snapshots: runtimes saved as tensor-aligned chunks, catalogued, verified on every read.

`SnapshotStore` joins the catalog (which snapshots exist, which chunks they hold, how much
of the budget they use) and one host's `ChunkStore` (the bytes). Writers get a
`SnapshotWriter` from `begin`; restores read inside `reading()`, which keeps eviction off the
snapshot while it is read. A chunk that fails its hash marks its snapshot CORRUPT.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from torpor.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from torpor.log import get_logger
from torpor.store import capacity, rows, scrub
from torpor.store.capacity import StoreUsage
from torpor.store.catalog import Catalog
from torpor.store.chunks import ChunkRef, ChunkStore, check_hash
from torpor.store.locks import StoreLocks, check_snapshot_id
from torpor.store.names import check_fingerprint, validate_model_name
from torpor.store.records import (
    GcReport,
    ScrubReport,
    SnapshotContents,
    SnapshotDetails,
    SnapshotInfo,
    SweepReport,
)
from torpor.store.schema import ChunkRow, EventRow, ModelRow, SnapshotRow, SnapshotState
from torpor.store.store_config import SnapshotStoreConfig
from torpor.store.writer import SnapshotWriter

log = get_logger("store.snapshots")


class SnapshotStore:
    """The snapshots of one host's chunk store, over a (possibly shared) catalog."""

    def __init__(self, catalog: Catalog, config: SnapshotStoreConfig) -> None:
        self.catalog = catalog
        self.config = config
        self.chunks = ChunkStore(config.root)
        self.locks = StoreLocks(config.root)
        self.store_id = self.chunks.store_id
        self.untracked_bytes = 0
        """Temp and orphan chunk files the last scrub or sweep found and left (they count
        against the budget: `capacity.usage`)."""
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    @classmethod
    def open(
        cls, catalog: Catalog, config: SnapshotStoreConfig, *, run_scrub: bool = True
    ) -> SnapshotStore:
        """Open the store; by default scrub it first (the daemon does so at start-up)."""
        store = cls(catalog, config)
        if run_scrub:
            store.scrub()
        return store

    # Writing ----------------------------------------------------------------------------

    def begin(self, model: str, fingerprint: str | None, *, reserve_bytes: int) -> SnapshotWriter:
        """Start a snapshot of `model`, reserving room for `reserve_bytes` of new chunks.

        Evicts LRU snapshots if needed; raises ResourceExhausted (STORE_FULL) with the store
        unchanged when the reservation cannot fit. The reservation is an upper bound of
        the new bytes (the full size, unless the caller knows what dedups).
        `fingerprint` may be None when it is known only once the bytes are written (torpord
        reserves before its worker writes): `commit` then gives it.
        """
        validate_model_name(model)
        if fingerprint is not None:
            check_fingerprint(fingerprint)
        if not isinstance(reserve_bytes, int) or reserve_bytes < 0:
            raise InvalidArgument(
                f"reserve_bytes must be a byte count >= 0, got {reserve_bytes!r}",
                reason="INVALID_RESERVATION",
            )
        snapshot_id = uuid.uuid4().hex
        lock = self.locks.hold_writer(snapshot_id)  # before the row exists: see scrub
        now = self.catalog.clock()

        def insert(s: Session) -> None:
            if s.get(ModelRow, model) is None:
                raise NotFound(f"model {model!r} is not registered", reason="MODEL_NOT_FOUND")
            s.add(
                SnapshotRow(
                    id=snapshot_id,
                    store_id=self.store_id,
                    model_name=model,
                    fingerprint=fingerprint or "",  # readers never see WRITING rows
                    state=SnapshotState.WRITING,
                    total_bytes=0,
                    reserved_bytes=reserve_bytes,
                    manifest=None,
                    created_at=now,
                    last_used_at=now,
                    pinned=False,
                )
            )

        try:
            capacity.reserve(self, reserve_bytes, insert)
        except BaseException:
            lock.release()
            raise
        log.info("snapshot_begun", snapshot=snapshot_id, model=model, reserve_bytes=reserve_bytes)
        return SnapshotWriter(self, snapshot_id, model, reserve_bytes, lock)

    def usage(self) -> StoreUsage:
        """Bytes used and reserved against the budget."""
        with self.catalog.session(write=False) as s:
            return capacity.usage(self, s)

    # The snapshots torpord's policy counts --------------------------------------------------

    def hold(self, snapshot_id: str) -> None:
        """Keep a snapshot out of the LRU eviction of `begin` (not out of `delete`): torpord
        holds each registered model's current snapshot, whose bytes its policy counts and
        restores from. Held in this process only; an operator's pin is `pinned`."""
        check_snapshot_id(snapshot_id)
        with self._held_lock:
            self._held.add(snapshot_id)

    def release(self, snapshot_id: str) -> None:
        """Undo `hold` (idempotent)."""
        with self._held_lock:
            self._held.discard(snapshot_id)

    def held(self) -> frozenset[str]:
        """The snapshots held now."""
        with self._held_lock:
            return frozenset(self._held)

    def bytes_outside(self, tracked: Iterable[str]) -> int:
        """Bytes on disk that no snapshot in `tracked` accounts for: chunks only other
        snapshots reference (a chunk shared with a tracked one counts there), and the temp
        and orphan files the last sweep left. What torpord's policy adds to its own count of
        the tracked snapshots to cover the whole store. Reservations are not in it: the only
        writer is torpord, whose policy counts each write it starts."""
        ids = set(tracked)
        with self.catalog.session(write=False) as s:
            table = rows.chunk_table(s, self.store_id)
            covered: set[str] = set()
            for snapshot_id in ids:
                covered.update(ref.hash for ref in rows.snapshot_chunks(s, snapshot_id))
        outside = sum(row.size for digest, row in table.items() if digest not in covered)
        return outside + self.untracked_bytes

    # Reading ----------------------------------------------------------------------------

    def get(self, snapshot_id: str) -> SnapshotInfo:
        """A finished (complete or corrupt) snapshot; NotFound for unknown or unfinished."""
        check_snapshot_id(snapshot_id)
        with self.catalog.session(write=False) as s:
            row = rows.get_snapshot(s, snapshot_id)
            if row.state == SnapshotState.WRITING:
                raise _not_found(snapshot_id)
            return rows.snapshot_info(row)

    def list(
        self, model: str | None = None, *, include_corrupt: bool = False, all_stores: bool = False
    ) -> tuple[SnapshotInfo, ...]:
        """Finished snapshots, newest first; by default complete ones in this store only."""
        states = [SnapshotState.COMPLETE] + ([SnapshotState.CORRUPT] if include_corrupt else [])
        query = select(SnapshotRow).where(SnapshotRow.state.in_(states))
        if model is not None:
            query = query.where(SnapshotRow.model_name == validate_model_name(model))
        if not all_stores:
            query = query.where(SnapshotRow.store_id == self.store_id)
        query = query.order_by(SnapshotRow.created_at.desc(), SnapshotRow.id)
        with self.catalog.session(write=False) as s:
            return tuple(rows.snapshot_info(r) for r in s.scalars(query))

    @contextlib.contextmanager
    def reading(self, snapshot_id: str) -> Iterator[SnapshotContents]:
        """Read a complete local snapshot: its manifest and chunks, safe from eviction.

        Raises NotFound (unknown, unfinished or deleted), DataLoss (SNAPSHOT_CORRUPT) or
        FailedPrecondition (SNAPSHOT_NOT_LOCAL: its bytes are on another host).
        """
        with self.locks.reading(check_snapshot_id(snapshot_id)):
            with self.catalog.session(write=False) as s:
                row = rows.get_snapshot(s, snapshot_id)
                _check_readable(row, self.store_id)
                contents = SnapshotContents(
                    info=rows.snapshot_info(row),
                    manifest=dict(row.manifest or {}),
                    chunks=rows.snapshot_chunks(s, snapshot_id),
                )
            yield contents

    def read_chunk_into(self, snapshot_id: str, ref: ChunkRef, buf: memoryview) -> None:
        """`read_chunk` into a caller's buffer (exactly `ref.size` bytes)."""
        try:
            self.chunks.read_into(ref, buf)
        except DataLoss as exc:
            self.mark_corrupt(snapshot_id, exc.metadata.get("problem", str(exc)), ref.hash)
            raise

    # Bookkeeping -----------------------------------------------------------------------

    def touch(self, snapshot_id: str) -> None:
        """Record a use (a restore started from it): it moves to the back of the LRU order."""
        check_snapshot_id(snapshot_id)
        with self.catalog.session() as s:
            rows.touch(s, snapshot_id, self.catalog.clock())

    def mark_corrupt(self, snapshot_id: str, problem: str, chunk_hash: str | None = None) -> bool:
        """Move a complete snapshot to CORRUPT and log an event; False if it was not complete.

        The pager calls this when it reads chunks itself and `verify` fails.
        """
        check_snapshot_id(snapshot_id)
        with self.catalog.session() as s:
            changed = rows.mark_corrupt(s, [snapshot_id])
            for row in changed:
                detail = {"snapshot": row.id, "problem": problem, "chunk": chunk_hash}
                s.add(
                    EventRow(
                        ts=self.catalog.clock(),
                        kind="snapshot_corrupt",
                        model=row.model_name,
                        detail=detail,
                    )
                )
        if changed:
            log.error("snapshot_corrupt", snapshot=snapshot_id, problem=problem, chunk=chunk_hash)
        if chunk_hash is not None:
            self._quarantine_chunk(chunk_hash)
        return bool(changed)

    def _quarantine_chunk(self, chunk_hash: str) -> bool:
        """Move a local chunk file away if it really fails its hash (re-read to make sure),
        so that the next snapshot of the same bytes writes a good copy; True if moved.

        Every snapshot using the chunk is then unreadable, as it already was in truth.
        """
        with self.catalog.session(write=False) as s:
            row = s.get(ChunkRow, (self.store_id, check_hash(chunk_hash)))
        if row is None:
            return False
        with self.locks.exclusive():  # no writer is between dedup and reference
            return self.chunks.quarantine(ChunkRef(row.hash, row.size)) is not None

    def delete(self, snapshot_id: str) -> GcReport:
        """Delete a finished snapshot and the chunks only it used (DeleteSnapshot).

        FailedPrecondition if it is being read (SNAPSHOT_IN_USE) or written (SNAPSHOT_WRITING).
        """
        claim = self.locks.try_claim_for_delete(check_snapshot_id(snapshot_id))
        if claim is None:
            raise FailedPrecondition(
                f"snapshot {snapshot_id} is being read by a restore; try again after it ends",
                reason="SNAPSHOT_IN_USE",
                metadata={"snapshot": snapshot_id},
            )
        try:
            with self.locks.exclusive():
                with self.catalog.session() as s:
                    row = rows.get_snapshot(s, snapshot_id, lock=True)
                    if row.state == SnapshotState.WRITING:
                        raise FailedPrecondition(
                            f"snapshot {snapshot_id} is still being written",
                            reason="SNAPSHOT_WRITING",
                            metadata={"snapshot": snapshot_id},
                        )
                    rows.delete_snapshot_rows(s, row)
                    # Another host's chunks are collected by that host (its files, its lock).
                    local = row.store_id == self.store_id
                    gone = rows.take_unreferenced(s, self.store_id) if local else []
                for ref in gone:
                    self.chunks.delete(ref.hash)
        except BaseException:
            claim.release(remove=False)
            raise
        claim.release(remove=True)
        log.info("snapshot_deleted", snapshot=snapshot_id, model=row.model_name, chunks=len(gone))
        return GcReport(chunks_removed=len(gone), bytes_freed=sum(r.size for r in gone))

    def delete_model_snapshots(self, model: str) -> int:
        """Delete every finished snapshot of a model in this store; returns how many."""
        snapshots = self.list(model, include_corrupt=True)
        for info in snapshots:
            self.delete(info.id)
        return len(snapshots)

    def details(self, snapshot_id: str) -> SnapshotDetails:
        """What ListSnapshots shows beyond the info: chunk count, the bytes only this snapshot
        holds (freed by deleting it) and its manifest (no bytes are read)."""
        with self.catalog.session(write=False) as s:
            row = rows.get_snapshot(s, check_snapshot_id(snapshot_id))
            chunks = rows.snapshot_chunks(s, snapshot_id)
            counts = rows.membership_counts(s, snapshot_id)
            table = rows.chunk_table(s, self.store_id)
            unique = sum(
                table[h].size for h, n in counts.items() if h in table and table[h].refcount <= n
            )
            return SnapshotDetails(len(chunks), unique, dict(row.manifest or {}))

    def collect_garbage(self, *, dry_run: bool = False) -> GcReport:
        """Delete chunks that no snapshot references (CollectGarbage); `dry_run` reports only."""
        return capacity.collect_garbage(self, dry_run=dry_run)

    def scrub(self, *, deep: bool = False) -> ScrubReport:
        """Reconcile files and catalog (start-up); `deep` also re-hashes every chunk."""
        return scrub.scrub(self, deep=deep)

    def sweep(self, *, min_age_s: float = 0.0) -> SweepReport:
        """Remove temp and orphan chunk files of failed or killed writes while the store is
        in use (the daemon runs it periodically and after a failed snapshot write). Chunks
        written but not yet referenced look like orphans: run it only when no such write is
        in flight, or with a `min_age_s` longer than any write."""
        return scrub.sweep(self, min_age_s=min_age_s)


def _not_found(snapshot_id: str) -> NotFound:
    return NotFound(
        f"snapshot {snapshot_id} does not exist or is not complete",
        reason="SNAPSHOT_NOT_FOUND",
        metadata={"snapshot": snapshot_id},
    )


def _check_readable(row: SnapshotRow, store_id: str) -> None:
    if row.state == SnapshotState.WRITING:
        raise _not_found(row.id)
    if row.state == SnapshotState.CORRUPT:
        raise DataLoss(
            f"snapshot {row.id} of {row.model_name} is corrupt",
            reason="SNAPSHOT_CORRUPT",
            metadata={"snapshot": row.id, "model": row.model_name},
        )
    if row.store_id != store_id:
        raise FailedPrecondition(
            f"snapshot {row.id} is stored on another host (store {row.store_id})",
            reason="SNAPSHOT_NOT_LOCAL",
            metadata={"snapshot": row.id, "store": row.store_id},
        )
