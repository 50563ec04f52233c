"""The disk budget's one owner (issue 13): the core counts each tracked snapshot at the
bytes the store holds for it once recorded, tells torpord that count as the reservation of
a write, and counts what the store holds outside its runtimes (DiskOutsideMeasured)."""

from __future__ import annotations

from dataclasses import replace

from torpor.errors import Code, DataLoss, Unavailable
from torpor.scheduler.core import (
    ClientGone,
    DiskOutsideMeasured,
    EvictFinished,
    EvictRequested,
    RuntimeState,
    Suspend,
    Tier,
    TransitionCompleted,
    TransitionFailed,
)

from .harness import GiB, Harness, footprint, world

S = RuntimeState


def _resident(disk: float = 200, snapshot: int = 0) -> Harness:
    h = Harness(world(disk=disk))
    h.register("a", 10, fp=replace(footprint(10), snapshot=snapshot))
    h.acquire("a", client="holder")
    h.settle()
    h.send(ClientGone("holder"))
    return h


def _disk_held(h: Harness) -> int:
    return sum(h.state.held(rt).disk for rt in h.state.runtimes.values())


def test_a_snapshot_write_reserves_what_the_core_counts() -> None:
    """The Suspend names the bytes the core counts for the snapshot (its estimate), which
    torpord reserves before the worker writes."""
    h = _resident(snapshot=11 * GiB)
    h.send(EvictRequested("e1", "a", Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    assert move.write_snapshot and move.snapshot_bytes == 11 * GiB
    assert _disk_held(h) == 11 * GiB


def test_a_recorded_snapshot_counts_the_bytes_the_store_holds() -> None:
    h = _resident()
    h.send(EvictRequested("e1", "a", Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    assert move.snapshot_bytes == 10 * GiB  # no estimate: the weights stand in
    del h.moves[(move.runtime_id, move.seq)]
    real = 10 * GiB + 3 * 1024**2  # the weights, the small files and the manifest
    h.send(TransitionCompleted(move.runtime_id, move.seq, S.SUSPENDED_DISK, snapshot_bytes=real))
    assert h.rt("a").state is S.SUSPENDED_DISK
    assert _disk_held(h) == real


def test_bytes_outside_the_runtimes_fill_the_disk_budget() -> None:
    """With the store's other bytes counted, a snapshot that would fit the capacity alone
    does not fit: the eviction goes elsewhere (here: dropped, no snapshot written)."""
    h = _resident(disk=20)
    h.send(DiskOutsideMeasured(15 * GiB))
    assert h.state.disk_outside == 15 * GiB
    h.send(EvictRequested("e1", "a", Tier.DISK))
    actions = h.plans[-1].actions
    assert not [a for a in actions if isinstance(a, Suspend) and a.write_snapshot], actions
    [done] = [a for a in actions if isinstance(a, EvictFinished)]
    assert done.error is not None and done.error.code is Code.RESOURCE_EXHAUSTED
    h.send(DiskOutsideMeasured(0))
    h.send(EvictRequested("e2", "a", Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    assert move.write_snapshot


def test_a_load_keeps_the_snapshot_count_an_upper_bound() -> None:
    """The worker's measured footprint after a load says nothing of the snapshot: the
    registered count stays, grown by any weights measured beyond the estimate."""
    h = Harness(world())
    h.register("a", 10, fp=replace(footprint(10), snapshot=11 * GiB))
    h.acquire("a")
    [load] = list(h.moves.values())
    del h.moves[(load.runtime_id, load.seq)]
    measured = replace(footprint(10), weights=10 * GiB + 4096)
    h.send(TransitionCompleted(load.runtime_id, load.seq, S.RESIDENT, footprint=measured))
    assert h.state.models["a"].spec.footprint.snapshot == 11 * GiB + 4096


def test_the_next_snapshot_after_an_unusable_one_is_counted_at_its_bytes() -> None:
    h = Harness(world())
    h.register("a", 10, snapshot=True, fp=replace(footprint(10), snapshot=11 * GiB))
    h.acquire("a")
    [load] = list(h.moves.values())
    assert load.source is Tier.DISK
    del h.moves[(load.runtime_id, load.seq)]
    corrupt = DataLoss("chunk is corrupt", reason="CHUNK_CORRUPT")
    h.send(TransitionFailed(load.runtime_id, load.seq, corrupt, True, True, 12 * GiB))
    assert h.state.models["a"].spec.footprint.snapshot == 12 * GiB
    assert h.rt("a").at.snapshot


def test_a_snapshot_recorded_before_its_suspend_failed_stays_counted() -> None:
    """The write committed, then the worker died before unmapping: the runtime is FAILED
    and keeps the snapshot (restored from next time), counted at its bytes."""
    h = _resident()
    h.send(EvictRequested("e1", "a", Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    del h.moves[(move.runtime_id, move.seq)]
    died = Unavailable("the worker died", reason="WORKER_DIED")
    h.send(TransitionFailed(move.runtime_id, move.seq, died, snapshot_bytes=11 * GiB))
    rt = h.rt("a")
    assert rt.at.snapshot and _disk_held(h) == 11 * GiB
