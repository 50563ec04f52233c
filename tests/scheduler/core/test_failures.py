"""Failed transitions, dead workers, stale reports, and protocol bugs."""

from __future__ import annotations

import pytest

from torpor.errors import Code, DataLoss, FailedPrecondition, Internal
from torpor.scheduler.core import (
    ClientGone,
    EndLease,
    EvictRequested,
    LeaseEnd,
    Load,
    ModelUnregistered,
    RequestFinished,
    Resume,
    RuntimeState,
    SnapshotDeleted,
    Tier,
    TransitionCompleted,
    TransitionFailed,
    WorkerDied,
)

from .harness import Harness, world

S = RuntimeState


def _loads(h: Harness) -> list[Load]:
    return [a for a in h.plans[-1].actions if isinstance(a, Load)]


def test_a_failed_load_is_retried_by_a_new_worker() -> None:
    h = Harness(world())
    h.register("a", 10, snapshot=True)
    rid = h.acquire("a")
    [first] = _loads(h)
    assert first.source is Tier.DISK
    h.fail(first)
    assert (h.rt("a").at.state, h.rt("a").state) == (S.FAILED, S.LOADING)
    [retry] = _loads(h)  # recovered in the same step: the request is still queued
    assert retry.incarnation == first.incarnation + 1 and retry.source is Tier.DISK
    h.settle()
    assert rid in h.grants and h.rt("a").failures == 0


def test_repeated_load_failures_answer_the_queue_unavailable() -> None:
    h = Harness(world(max_load_failures=2))
    h.register("a", 10)
    rid = h.acquire("a")
    h.fail(_loads(h)[0])
    h.fail(_loads(h)[0])
    assert h.rejects[rid].code is Code.UNAVAILABLE and h.rejects[rid].reason == "LOAD_FAILED"
    assert h.rt("a").state is S.FAILED and not _loads(h)
    again = h.acquire("a")  # the next request tries again
    h.settle()
    assert again in h.grants


def _corrupt(move: Load | Resume, left: bool = False) -> TransitionFailed:
    error = DataLoss("chunk is corrupt", reason="CHUNK_CORRUPT")
    return TransitionFailed(move.runtime_id, move.seq, error, True, left)


def test_a_snapshot_that_proves_corrupt_falls_back_to_a_cold_load() -> None:
    """Issue 12: the restore from a corrupt snapshot fails; the waiting request is served
    by a cold load, and the runtime holds no snapshot (nor its disk bytes) any more."""
    h = Harness(world(max_load_failures=1))  # one counted failure would reject the queue
    h.register("a", 10, snapshot=True)
    rid = h.acquire("a")
    [load] = _loads(h)
    assert load.source is Tier.DISK
    del h.moves[(load.runtime_id, load.seq)]
    h.send(_corrupt(load))
    [cold] = _loads(h)
    assert cold.source is Tier.SOURCE and rid not in h.rejects
    assert not h.rt("a").at.snapshot and h.state.held(h.rt("a")).disk == 0
    h.settle()
    assert h.grants[rid].runtime_id == load.runtime_id and h.rt("a").failures == 0


def test_a_corrupt_snapshot_with_another_left_restores_from_that_one() -> None:
    h = Harness(world(max_load_failures=1))
    h.register("a", 10, snapshot=True)
    rid = h.acquire("a")
    [load] = _loads(h)
    del h.moves[(load.runtime_id, load.seq)]
    h.send(_corrupt(load, left=True))
    [again] = _loads(h)
    assert again.source is Tier.DISK and h.rt("a").at.snapshot
    h.settle()
    assert rid in h.grants


def test_a_resume_from_a_corrupt_snapshot_falls_back_too() -> None:
    """A runtime suspended to disk keeps its worker; a resume that finds the snapshot
    corrupt loses the worker (it is killed), and the request is served cold."""
    h = Harness(world(max_load_failures=1))
    h.register("a", 10)
    h.register("b", 10)
    h.acquire("a")
    h.settle()
    h.send(ClientGone("c"))
    h.send(EvictRequested("e1", "a", Tier.DISK))
    h.settle()
    assert h.rt("a").state is S.SUSPENDED_DISK
    rid = h.acquire("a", client="d")
    [resume] = [a for a in h.plans[-1].actions if isinstance(a, Resume)]
    assert resume.source is Tier.DISK
    del h.moves[(resume.runtime_id, resume.seq)]
    h.send(_corrupt(resume))
    [cold] = _loads(h)
    assert cold.source is Tier.SOURCE
    h.settle()
    assert rid in h.grants and rid not in h.rejects


def test_a_snapshot_deleted_mid_restore_is_refused() -> None:
    """Why the executor no longer reports SnapshotDeleted for a bad snapshot: the core
    refuses it while the runtime restores from it (and the report was then lost)."""
    h = Harness(world())
    h.register("a", 10, snapshot=True)
    h.acquire("a")
    with pytest.raises(FailedPrecondition):
        h.send(SnapshotDeleted("a"))


def test_a_dead_worker_ends_its_leases_unavailable_and_recovers_on_next_request() -> None:
    h = Harness(world())
    h.register("a", 10)
    rid = h.acquire("a")
    h.settle()
    h.kill(h.rt("a").id)
    [end] = [a for a in h.plans[-1].actions if isinstance(a, EndLease)]
    assert (end.lease_id, end.why) == (h.lease_of(rid), LeaseEnd.WORKER_DIED)
    assert end.error is not None and end.error.code is Code.UNAVAILABLE
    assert h.rt("a").state is S.FAILED and not h.state.leases
    again = h.acquire("a")
    h.settle()
    assert h.grants[again].restored_from is Tier.SOURCE


def test_stale_reports_are_ignored() -> None:
    h = Harness(world())
    h.register("a", 10)
    h.acquire("a")
    [load] = _loads(h)
    old_incarnation = h.rt("a").incarnation
    h.kill(h.rt("a").id)  # dies while loading; a new Load is planned at once
    [retry] = _loads(h)
    state = h.state
    h.send(TransitionCompleted(load.runtime_id, load.seq))  # the dead worker's report
    assert h.state.runtimes == state.runtimes
    h.send(WorkerDied(load.runtime_id, old_incarnation))
    assert h.rt("a").op is not None and h.rt("a").op.seq == retry.seq


def test_a_worker_reporting_another_state_than_planned_is_a_bug() -> None:
    h = Harness(world())
    h.register("a", 10)
    h.acquire("a")
    [load] = _loads(h)
    with pytest.raises(Internal):
        h.send(TransitionCompleted(load.runtime_id, load.seq, S.SUSPENDED_HOST))


def test_request_finished_without_started_is_a_bug() -> None:
    h = Harness(world())
    h.register("a", 10)
    with pytest.raises(Internal):
        h.send(RequestFinished("a"))


def test_unregister_drops_the_worker_then_forgets_the_model() -> None:
    h = Harness(world())
    h.register("a", 10)
    h.register("b", 10)
    rid = h.acquire("a")
    h.settle()
    with pytest.raises(FailedPrecondition):
        h.send(ModelUnregistered("a"))  # leased
    h.send(ClientGone("c"))
    queued = h.acquire("b")
    h.send(ModelUnregistered("a"))
    assert "a" in h.state.models and h.state.models["a"].unregistering
    h.settle()
    assert "a" not in h.state.models and queued in h.grants and rid in h.grants
    h.register("a", 10)  # the name is free again


def test_time_going_backwards_is_a_bug() -> None:
    h = Harness(world())
    h.tick(10.0)
    with pytest.raises(Internal):
        h.tick(-1.0)
