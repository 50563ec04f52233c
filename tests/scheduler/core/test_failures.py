"""Failed transitions, dead workers, stale reports, and protocol bugs."""

from __future__ import annotations

import pytest

from torpor.errors import Code, FailedPrecondition, Internal
from torpor.scheduler.core import (
    ClientGone,
    EndLease,
    LeaseEnd,
    Load,
    ModelUnregistered,
    RequestFinished,
    RuntimeState,
    Tier,
    TransitionCompleted,
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
