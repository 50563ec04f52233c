"""Row operations on snapshots and chunks, shared by the writer, eviction, GC and scrub.

Each function works inside a caller's transaction (`Catalog.session()`), so a caller
composes several into one atomic change. The invariant they keep: a chunk's `refcount`
equals the number of snapshot_chunks rows naming it, and a chunk row exists whenever its
file may be referenced. Files are deleted only after the rows are gone and committed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from torpor.errors import NotFound
from torpor.store.chunks import ChunkRef
from torpor.store.records import SnapshotInfo
from torpor.store.schema import ChunkRow, SnapshotChunkRow, SnapshotRow, SnapshotState


def snapshot_info(row: SnapshotRow) -> SnapshotInfo:
    """The boundary record of a snapshot row."""
    return SnapshotInfo(
        id=row.id,
        model=row.model_name,
        store_id=row.store_id,
        fingerprint=row.fingerprint,
        state=row.state,
        total_bytes=row.total_bytes,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        pinned=row.pinned,
    )


def get_snapshot(s: Session, snapshot_id: str, *, lock: bool = False) -> SnapshotRow:
    """The snapshot row; NotFound if there is none."""
    row = s.get(SnapshotRow, snapshot_id, with_for_update=lock)
    if row is None:
        raise NotFound(
            f"snapshot {snapshot_id} does not exist",
            reason="SNAPSHOT_NOT_FOUND",
            metadata={"snapshot": snapshot_id},
        )
    return row


def chunk_exists(s: Session, store_id: str, digest: str) -> bool:
    """Whether the catalog has a row (and so the store a file) for this chunk."""
    query = select(ChunkRow.hash).where(ChunkRow.store_id == store_id, ChunkRow.hash == digest)
    return s.execute(query).first() is not None


def claim_chunk(s: Session, store_id: str, ref: ChunkRef) -> None:
    """Add one reference to a chunk, creating its row if needed (atomic on both backends)."""
    insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(ChunkRow).values(store_id=store_id, hash=ref.hash, size=ref.size, refcount=1)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ChunkRow.store_id, ChunkRow.hash],
        set_={"refcount": ChunkRow.refcount + 1},
    )
    s.execute(stmt)


def snapshot_chunks(s: Session, snapshot_id: str) -> tuple[ChunkRef, ...]:
    """A snapshot's chunks in ordinal order."""
    query = (
        select(SnapshotChunkRow.hash, ChunkRow.size)
        .join(
            ChunkRow,
            (ChunkRow.store_id == SnapshotChunkRow.store_id)
            & (ChunkRow.hash == SnapshotChunkRow.hash),
        )
        .where(SnapshotChunkRow.snapshot_id == snapshot_id)
        .order_by(SnapshotChunkRow.ordinal)
    )
    return tuple(ChunkRef(h, size) for h, size in s.execute(query))


def membership_counts(s: Session, snapshot_id: str) -> dict[str, int]:
    """How many times each chunk hash occurs in a snapshot."""
    query = (
        select(SnapshotChunkRow.hash, func.count())
        .where(SnapshotChunkRow.snapshot_id == snapshot_id)
        .group_by(SnapshotChunkRow.hash)
    )
    return {h: int(n) for h, n in s.execute(query)}


def delete_snapshot_rows(s: Session, row: SnapshotRow) -> None:
    """Drop a snapshot and its memberships, releasing its chunk references.

    Chunks whose refcount drops to zero stay until `take_unreferenced` (GC) removes them.
    """
    for digest, count in membership_counts(s, row.id).items():
        s.execute(
            update(ChunkRow)
            .where(ChunkRow.store_id == row.store_id, ChunkRow.hash == digest)
            .values(refcount=ChunkRow.refcount - count)
        )
    s.execute(delete(SnapshotChunkRow).where(SnapshotChunkRow.snapshot_id == row.id))
    s.execute(delete(SnapshotRow).where(SnapshotRow.id == row.id))


def take_unreferenced(s: Session, store_id: str) -> list[ChunkRef]:
    """Delete the rows of chunks nobody references and return them (their files go next)."""
    stmt = (
        delete(ChunkRow)
        .where(ChunkRow.store_id == store_id, ChunkRow.refcount <= 0)
        .returning(ChunkRow.hash, ChunkRow.size)
    )
    return [ChunkRef(h, size) for h, size in s.execute(stmt)]


def unreferenced(s: Session, store_id: str) -> list[ChunkRef]:
    """The chunks nobody references (what take_unreferenced would delete)."""
    query = select(ChunkRow.hash, ChunkRow.size).where(
        ChunkRow.store_id == store_id, ChunkRow.refcount <= 0
    )
    return [ChunkRef(h, size) for h, size in s.execute(query)]


def used_bytes(s: Session, store_id: str) -> int:
    """Bytes of every chunk row of the store (each shared chunk once)."""
    query = select(func.coalesce(func.sum(ChunkRow.size), 0)).where(ChunkRow.store_id == store_id)
    return int(s.scalar(query) or 0)


def reserved_bytes(s: Session, store_id: str) -> int:
    """Bytes that live writers may still add under their reservations."""
    query = select(func.coalesce(func.sum(SnapshotRow.reserved_bytes), 0)).where(
        SnapshotRow.store_id == store_id, SnapshotRow.state == SnapshotState.WRITING
    )
    return int(s.scalar(query) or 0)


def eviction_candidates(s: Session, store_id: str) -> list[SnapshotRow]:
    """Unpinned finished snapshots of the store, in eviction order: corrupt ones first (they
    are useless), then complete ones, least recently used first."""
    query = (
        select(SnapshotRow)
        .where(
            SnapshotRow.store_id == store_id,
            SnapshotRow.state.in_([SnapshotState.COMPLETE, SnapshotState.CORRUPT]),
            SnapshotRow.pinned.is_(False),
        )
        .order_by(SnapshotRow.last_used_at, SnapshotRow.created_at, SnapshotRow.id)
    )
    rows = list(s.scalars(query))
    return sorted(rows, key=lambda r: r.state != SnapshotState.CORRUPT)  # stable: LRU kept


def chunk_table(s: Session, store_id: str) -> dict[str, ChunkRow]:
    """Every chunk row of the store by hash."""
    return {r.hash: r for r in s.scalars(select(ChunkRow).where(ChunkRow.store_id == store_id))}


def mark_corrupt(s: Session, snapshot_ids: Iterable[str]) -> list[SnapshotRow]:
    """Move complete snapshots to CORRUPT; returns the rows that changed."""
    ids = list(snapshot_ids)
    if not ids:
        return []
    query = select(SnapshotRow).where(
        SnapshotRow.id.in_(ids), SnapshotRow.state == SnapshotState.COMPLETE
    )
    rows = list(s.scalars(query))
    for row in rows:
        row.state = SnapshotState.CORRUPT
    return rows


def snapshots_using(s: Session, store_id: str, digests: Iterable[str]) -> set[str]:
    """Ids of the snapshots that reference any of these chunks."""
    wanted = list(digests)
    found: set[str] = set()
    for start in range(0, len(wanted), 500):  # bounded IN lists
        query = select(SnapshotChunkRow.snapshot_id).where(
            SnapshotChunkRow.store_id == store_id,
            SnapshotChunkRow.hash.in_(wanted[start : start + 500]),
        )
        found.update(s.scalars(query))
    return found


def touch(s: Session, snapshot_id: str, now: datetime) -> None:
    """Record a use of the snapshot (LRU order)."""
    s.execute(update(SnapshotRow).where(SnapshotRow.id == snapshot_id).values(last_used_at=now))
