"""The store's capacity budget: reservations, LRU eviction and garbage collection.

A writer reserves the bytes it may add before it writes them. When a reservation does not
fit, the least recently used unpinned snapshots are evicted (corrupt ones first) until it
does. The plan is computed before anything is deleted: if even evicting every candidate
would not make room, nothing is deleted and the caller gets ResourceExhausted. A chunk
still referenced by a surviving snapshot is never freed, so only unshared bytes count.

Everything here runs under the store lock held exclusive, so no chunk write is in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from torpor.errors import ResourceExhausted
from torpor.log import get_logger
from torpor.store import rows
from torpor.store.chunks import ChunkRef
from torpor.store.locks import DeleteClaim
from torpor.store.records import GcReport
from torpor.store.schema import SnapshotRow

if TYPE_CHECKING:
    from torpor.store.snapshots import SnapshotStore

log = get_logger("store.capacity")


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Bytes of the store against its budget."""

    capacity_bytes: int
    used_bytes: int
    """Chunk bytes on disk (each shared chunk once)."""
    reserved_bytes: int
    """Bytes that live writers may still add."""
    untracked_bytes: int = 0
    """Temp and orphan chunk files on disk that no catalog row counts (failed or killed
    writes), as the last sweep measured them: they take room until removed (issue 12)."""

    @property
    def free_bytes(self) -> int:
        """What a new reservation can take without evicting anything."""
        return self.capacity_bytes - self.used_bytes - self.reserved_bytes - self.untracked_bytes


@dataclass(frozen=True, slots=True)
class _Plan:
    victims: tuple[SnapshotRow, ...]
    claims: tuple[DeleteClaim, ...]
    freed_bytes: int


def usage(store: SnapshotStore, s: Session) -> StoreUsage:
    """Current usage of `store`, read in the caller's transaction."""
    return StoreUsage(
        capacity_bytes=store.config.capacity_bytes,
        used_bytes=rows.used_bytes(s, store.store_id),
        reserved_bytes=rows.reserved_bytes(s, store.store_id),
        untracked_bytes=store.untracked_bytes,
    )


def reserve(store: SnapshotStore, need: int, apply: Callable[[Session], None]) -> GcReport:
    """Make room for `need` more bytes, then run `apply` (which records the reservation)
    in the same transaction. Returns what eviction freed.

    Raises ResourceExhausted (reason STORE_FULL) and changes nothing if the bytes cannot
    fit even after evicting every unpinned, unheld, unread snapshot.
    """
    collect_garbage(store)  # zero-reference chunks are free space already
    with store.locks.exclusive():
        freed: list[ChunkRef] = []
        plan = _Plan((), (), 0)
        try:
            with store.catalog.session() as s:
                plan = _plan(store, s, need)
                for row in plan.victims:
                    rows.delete_snapshot_rows(s, row)
                freed = rows.take_unreferenced(s, store.store_id)
                apply(s)
        except BaseException:
            for claim in plan.claims:
                claim.release(remove=False)
            raise
        for ref in freed:
            store.chunks.delete(ref.hash)
        for claim in plan.claims:
            claim.release(remove=True)
    for row in plan.victims:
        log.info(
            "snapshot_evicted",
            snapshot=row.id,
            model=row.model_name,
            state=row.state.value,
            last_used_at=row.last_used_at.isoformat(),
            need_bytes=need,
        )
    return GcReport(chunks_removed=len(freed), bytes_freed=sum(r.size for r in freed))


def _plan(store: SnapshotStore, s: Session, need: int) -> _Plan:
    """Choose victims in eviction order until `need` bytes fit; raise if they never do."""
    current = usage(store, s)
    if need <= current.free_bytes:
        return _Plan((), (), 0)
    table = rows.chunk_table(s, store.store_id)
    refcounts = {h: r.refcount for h, r in table.items()}
    victims: list[SnapshotRow] = []
    claims: list[DeleteClaim] = []
    freed = 0
    held = store.held()
    for row in rows.eviction_candidates(s, store.store_id):
        if need <= current.free_bytes + freed:
            break
        if row.id in held:
            continue  # torpord counts it and restores from it: only it may delete it
        claim = store.locks.try_claim_for_delete(row.id)
        if claim is None:
            continue  # being read by a restore: never pulled from under it
        claims.append(claim)
        victims.append(row)
        for digest, count in rows.membership_counts(s, row.id).items():
            refcounts[digest] -= count
            if refcounts[digest] == 0:
                freed += table[digest].size
    if need > current.free_bytes + freed:
        for claim in claims:
            claim.release(remove=False)
        raise ResourceExhausted(
            f"snapshot store is full: {need} bytes needed, {current.free_bytes} free of "
            f"{current.capacity_bytes}; evicting every unpinned, unheld snapshot would free only "
            f"{freed} more",
            reason="STORE_FULL",
            metadata={
                "need_bytes": need,
                "free_bytes": current.free_bytes,
                "capacity_bytes": current.capacity_bytes,
                "used_bytes": current.used_bytes,
                "reserved_bytes": current.reserved_bytes,
                "untracked_bytes": current.untracked_bytes,
                "evictable_bytes": freed,
            },
        )
    return _Plan(tuple(victims), tuple(claims), freed)


def collect_garbage(store: SnapshotStore, *, dry_run: bool = False) -> GcReport:
    """Delete chunks no snapshot references: rows first (committed), then files. With
    `dry_run`, only report what would go."""
    if dry_run:
        with store.catalog.session(write=False) as s:
            gone = rows.unreferenced(s, store.store_id)
        return GcReport(chunks_removed=len(gone), bytes_freed=sum(r.size for r in gone))
    with store.locks.exclusive():
        with store.catalog.session() as s:
            gone = rows.take_unreferenced(s, store.store_id)
        for ref in gone:
            store.chunks.delete(ref.hash)
    report = GcReport(chunks_removed=len(gone), bytes_freed=sum(r.size for r in gone))
    if gone:
        log.info(
            "chunks_collected", store=store.store_id, chunks=len(gone), bytes=report.bytes_freed
        )
    return report
