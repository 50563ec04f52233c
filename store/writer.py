"""Writing one snapshot: reserve, add chunks tensor by tensor, commit last.

The protocol (docs/STORE.md, "Crash safety"):

1. `SnapshotStore.begin` takes the writer lock, makes room for the reservation and inserts
   the snapshot row in state WRITING (invisible to readers).
2. Each chunk is written durably (`ChunkStore.put`), then referenced in the catalog, both
   under the store lock held shared so garbage collection cannot slip in between.
3. `commit` flips the row to COMPLETE with the manifest in one transaction: the snapshot
   becomes visible only now, when every byte is already on disk.

A writer that dies at any point leaves a WRITING row whose writer lock is free, chunk files
without rows, or temp files; scrub removes all three.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from torpor.errors import Aborted, DataLoss, FailedPrecondition, InvalidArgument
from torpor.log import get_logger
from torpor.store import capacity, rows
from torpor.store.chunks import Buffer, ChunkRef, hash_bytes
from torpor.store.locks import WriterLock
from torpor.store.names import check_fingerprint
from torpor.store.records import SnapshotInfo
from torpor.store.schema import SnapshotChunkRow, SnapshotRow, SnapshotState

if TYPE_CHECKING:
    from torpor.store.snapshots import SnapshotStore

log = get_logger("store.writer")


class SnapshotWriter:
    """An open snapshot of one model; use as a context manager.

    Leaving the block without `commit()` (an exception, a cancelled snapshot) aborts: the
    snapshot row and the references it took are dropped and unshared chunks collected.
    Not thread-safe: one writer per thread.
    """

    def __init__(
        self, store: SnapshotStore, snapshot_id: str, model: str, reserved: int, lock: WriterLock
    ) -> None:
        self.store = store
        self.id = snapshot_id
        self.model = model
        self._reserved_left = reserved
        self._lock = lock
        self._ordinal = 0
        self._total = 0
        self._done = False

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()

    def add_tensor(self, data: Buffer) -> tuple[ChunkRef, ...]:
        """Add one tensor's bytes: one chunk, or fixed-size pieces of a huge tensor.

        Boundaries follow the tensor (pieces start at offsets that are multiples of
        `max_chunk_bytes` inside it), so an unchanged tensor dedups across snapshots.
        """
        view = memoryview(data).cast("B")
        step = self.store.config.max_chunk_bytes
        if view.nbytes <= step:
            return (self.add_chunk(view),)
        return tuple(self.add_chunk(view[at : at + step]) for at in range(0, view.nbytes, step))

    def add_chunk(self, data: Buffer) -> ChunkRef:
        """Store one chunk durably and append it to the snapshot; returns its ref."""
        self._check_open()
        view = memoryview(data).cast("B")
        ref = ChunkRef(hash_bytes(view), view.nbytes)
        store = self.store
        while True:
            with store.locks.shared():
                is_new = not self._known(ref)
                if not is_new or ref.size <= self._reserved_left:
                    store.chunks.put(view)
                    self._reference(ref, is_new)
                    return ref
            # A new chunk beyond the reservation: grow it (may evict; needs the lock
            # exclusive, so the shared one is released first), then try again.
            self._grow(ref.size - self._reserved_left)

    def add_stored(self, ref: ChunkRef) -> ChunkRef:
        """Append a chunk another process (a worker) already wrote to the chunk store.

        The file must be there with the right size; its bytes are verified on every read,
        as any chunk's are. DataLoss (CHUNK_MISSING) if it is not there.
        """
        self._check_open()
        store = self.store
        while True:
            with store.locks.shared():
                if not store.chunks.has(ref):
                    raise DataLoss(
                        f"chunk {ref.hash} ({ref.size} bytes) is not in the chunk store",
                        reason="CHUNK_MISSING",
                        metadata={"hash": ref.hash, "size": ref.size},
                    )
                is_new = not self._known(ref)
                if not is_new or ref.size <= self._reserved_left:
                    self._reference(ref, is_new)
                    return ref
            self._grow(ref.size - self._reserved_left)

    def commit(
        self, manifest: Mapping[str, Any], *, fingerprint: str | None = None
    ) -> SnapshotInfo:
        """Make the snapshot visible with the pager's manifest (any JSON object), and its
        environment's `fingerprint` if `begin` was not given one."""
        self._check_open()
        document = _json_document(manifest)
        now = self.store.catalog.clock()
        values: dict[str, Any] = {
            "state": SnapshotState.COMPLETE,
            "manifest": document,
            "reserved_bytes": 0,
            "last_used_at": now,
        }
        if fingerprint is not None:
            values["fingerprint"] = check_fingerprint(fingerprint)
        with self.store.catalog.session() as s:
            if fingerprint is None and not rows.get_snapshot(s, self.id).fingerprint:
                raise InvalidArgument(
                    f"snapshot {self.id} was begun without a fingerprint: commit needs one",
                    reason="INVALID_FINGERPRINT",
                )
            result = s.execute(
                update(SnapshotRow)
                .where(SnapshotRow.id == self.id, SnapshotRow.state == SnapshotState.WRITING)
                .values(**values)
            )
            if getattr(result, "rowcount", 0) != 1:
                raise Aborted(
                    f"snapshot {self.id} was removed while being written",
                    reason="SNAPSHOT_REMOVED",
                    metadata={"snapshot": self.id, "model": self.model},
                )
            info = rows.snapshot_info(rows.get_snapshot(s, self.id))
        self._done = True
        self._lock.release()  # only now: the row has left WRITING
        log.info(
            "snapshot_committed",
            snapshot=self.id,
            model=self.model,
            chunks=self._ordinal,
            bytes=self._total,
        )
        return info

    def abort(self) -> None:
        """Drop the unfinished snapshot (idempotent); its new chunks are collected."""
        if self._done:
            return
        self._done = True
        try:
            with self.store.catalog.session() as s:
                row = s.get(SnapshotRow, self.id)
                if row is not None and row.state == SnapshotState.WRITING:
                    rows.delete_snapshot_rows(s, row)
        finally:
            self._lock.release()
        capacity.collect_garbage(self.store)
        log.info("snapshot_aborted", snapshot=self.id, model=self.model, chunks=self._ordinal)

    def _check_open(self) -> None:
        if self._done:
            raise FailedPrecondition(
                f"snapshot {self.id} is already committed or aborted",
                reason="SNAPSHOT_CLOSED",
                metadata={"snapshot": self.id},
            )

    def _known(self, ref: ChunkRef) -> bool:
        with self.store.catalog.session(write=False) as s:
            return rows.chunk_exists(s, self.store.store_id, ref.hash)

    def _reference(self, ref: ChunkRef, is_new: bool) -> None:
        """Reference a chunk whose file is durable: membership, refcount, totals."""
        left = self._reserved_left - ref.size if is_new else self._reserved_left
        with self.store.catalog.session() as s:
            rows.claim_chunk(s, self.store.store_id, ref)
            s.add(
                SnapshotChunkRow(
                    snapshot_id=self.id,
                    ordinal=self._ordinal,
                    store_id=self.store.store_id,
                    hash=ref.hash,
                )
            )
            s.execute(
                update(SnapshotRow)
                .where(SnapshotRow.id == self.id)
                .values(
                    total_bytes=SnapshotRow.total_bytes + ref.size,
                    reserved_bytes=left,
                )
            )
        self._reserved_left = left
        self._ordinal += 1
        self._total += ref.size

    def _grow(self, extra: int) -> None:
        def record(s: Session) -> None:
            s.execute(
                update(SnapshotRow)
                .where(SnapshotRow.id == self.id)
                .values(reserved_bytes=SnapshotRow.reserved_bytes + extra)
            )

        capacity.reserve(self.store, extra, record)
        self._reserved_left += extra
        log.debug("reservation_grown", snapshot=self.id, model=self.model, extra_bytes=extra)


def _json_document(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as a plain JSON object; InvalidArgument if it is not one."""
    if not isinstance(manifest, Mapping):
        raise InvalidArgument(
            f"a snapshot manifest must be a JSON object, got {type(manifest).__name__}",
            reason="INVALID_MANIFEST",
        )
    try:
        return dict(json.loads(json.dumps(dict(manifest), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"snapshot manifest is not JSON-serializable: {exc}", reason="INVALID_MANIFEST"
        ) from exc
