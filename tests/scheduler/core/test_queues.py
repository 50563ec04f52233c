"""Queues: the bound, deadlines, cancellation, ranking, and the starvation cap."""

from __future__ import annotations

import pytest

from torpor.errors import Code
from torpor.scheduler.core import ClientGone, Load, Reason, Suspend

from .harness import Harness, world


def _loading(**config) -> Harness:
    """A model whose runtime is loading, so that new requests for it queue."""
    h = Harness(world(gpus=(40,), **config))
    h.register("a", 10)
    h.acquire("a")
    return h


def test_a_full_queue_is_resource_exhausted_at_once() -> None:
    h = _loading(queue_bound=2)
    h.acquire("a")  # the first request is queued too (the runtime is loading)
    rid = h.acquire("a")
    error = h.rejects[rid]
    assert (error.code, error.reason) == (Code.RESOURCE_EXHAUSTED, "QUEUE_FULL")
    assert error.metadata["queue_bound"] == "2"
    assert len(h.state.queues["a"]) == 2
    h.settle()
    assert len(h.grants) == 2


def test_a_deadline_that_passes_while_queued_is_deadline_exceeded() -> None:
    h = _loading()
    rid = h.acquire("a", deadline=5.0)
    assert h.plans[-1].wake_at == 5.0
    h.tick(4.999)
    assert rid not in h.rejects
    h.tick(0.001)
    assert h.rejects[rid].code is Code.DEADLINE_EXCEEDED
    assert all(w.request_id != rid for w in h.state.queues.get("a", ()))


def test_a_deadline_already_past_is_rejected_at_once() -> None:
    h = _loading()
    h.tick(10)
    rid = h.acquire("a", deadline=9.0)
    assert h.rejects[rid].code is Code.DEADLINE_EXCEEDED


def test_a_client_that_goes_away_cancels_its_queued_requests() -> None:
    h = _loading()
    mine = h.acquire("a", client="gone")
    other = h.acquire("a", client="stays")
    h.send(ClientGone("gone"))
    assert h.rejects[mine].code is Code.CANCELLED
    h.settle()
    assert other in h.grants and mine not in h.grants


def test_higher_priority_heads_are_placed_first() -> None:
    h = Harness(world(gpus=(24,)))
    h.register("holder", 20)
    h.register("low", 20)
    h.register("high", 20)
    h.acquire("holder", client="holder")
    h.settle()
    low = h.acquire("low", client="low", priority=-5)
    high = h.acquire("high", client="high", priority=5)
    h.send(ClientGone("holder"))
    h.settle()
    # Only one fits at a time: high is served first although low came first.
    assert high in h.grants and low not in h.grants
    h.send(ClientGone("high"))
    h.settle()
    assert low in h.grants


def _contended(**config) -> tuple[Harness, str]:
    """Model r is resident and leased; w waits for r's GPU (only one of them fits)."""
    h = Harness(world(gpus=(40,), **config))
    h.register("r", 20)
    h.register("w", 20)
    h.acquire("r", client="first")
    h.settle()
    waiting = h.acquire("w", client="w")
    assert h.plans[-1].decisions[0].blockers == (h.rt("r").id,)
    return h, waiting


def test_a_resident_model_serves_its_requests_up_to_the_cap_then_yields() -> None:
    h, waiting = _contended(starvation_cap=3, starvation_wait_s=1e6)
    served = [h.acquire("r", client=f"c{i}") for i in range(3)]
    assert all(rid in h.grants for rid in served)  # resident work first...
    assert h.rt("r").id in h.state.closing  # ...up to the cap
    late = h.acquire("r", client="late")
    assert late not in h.grants
    assert {d.model: d.reason for d in h.plans[-1].decisions}["r"] is Reason.QUEUE_YIELDING
    for client in ["first", *(f"c{i}" for i in range(3))]:
        h.send(ClientGone(client), dt=1)
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    assert move.model == "r"  # the yielding model goes although it has a queue
    h.settle()
    assert waiting in h.grants
    h.send(ClientGone("w"), dt=1)
    h.settle()
    assert late in h.grants  # and its own queue is served afterwards: nobody starves


def test_a_waiting_head_older_than_the_wait_cap_makes_its_blockers_yield() -> None:
    h, _waiting = _contended(starvation_cap=1000, starvation_wait_s=10.0)
    assert h.plans[-1].wake_at == pytest.approx(10.0)
    early = h.acquire("r", client="early")
    assert early in h.grants
    h.tick(10.0)
    assert h.rt("r").id in h.state.closing
    late = h.acquire("r", client="late")
    assert late not in h.grants


def test_yielding_ends_when_the_waiter_is_gone() -> None:
    h, _waiting = _contended(starvation_cap=1, starvation_wait_s=1e6)
    h.acquire("r", client="c0")
    assert h.rt("r").id in h.state.closing
    queued = h.acquire("r", client="c1")
    assert queued not in h.grants
    h.send(ClientGone("w"))  # the waiter gives up
    assert queued in h.grants
    assert not h.state.closing


def test_every_queued_request_is_answered_once_capacity_exists() -> None:
    h = Harness(world(gpus=(24,)))
    for name in "abc":
        h.register(name, 20)
    rids = [h.acquire(m, client=f"{m}{i}") for i in range(3) for m in "abc"]
    for _ in range(50):
        if all(r in h.grants for r in rids):
            break
        h.settle()
        for grant in list(h.grants.values()):
            if grant.lease_id in h.state.leases:
                h.send(ClientGone(h.state.leases[grant.lease_id].client), dt=1)
    assert all(r in h.grants for r in rids)
    loads = [a for p in h.plans for a in p.actions if isinstance(a, Load)]
    assert len(loads) <= 6  # batched per model, not one swap per request
