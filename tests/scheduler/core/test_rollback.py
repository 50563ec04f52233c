"""A suspend that fails before changing anything (a snapshot the store has no room for,
issue 12): TransitionRolledBack puts the runtime back where it was, with its worker."""

from __future__ import annotations

from torpor.errors import Code, ResourceExhausted
from torpor.scheduler.core import (
    ClientGone,
    DrainRequested,
    Drop,
    EvictFinished,
    EvictRequested,
    RuntimeState,
    Suspend,
    Tier,
    TransitionRolledBack,
)

from .harness import Harness, world

S = RuntimeState
FULL = ResourceExhausted("chunk store is full", reason="STORE_FULL")


def _resident(**kw: object) -> Harness:
    h = Harness(world(**kw))  # type: ignore[arg-type]
    h.register("a", 10)
    h.acquire("a", client="holder")
    h.settle()
    h.send(ClientGone("holder"))
    return h


def _roll_back(h: Harness, move: Suspend) -> None:
    del h.moves[(move.runtime_id, move.seq)]
    h.send(TransitionRolledBack(move.runtime_id, move.seq, FULL))


def test_a_failed_snapshot_write_puts_the_runtime_back_and_answers_the_eviction() -> None:
    h = _resident()
    incarnation = h.rt("a").incarnation
    h.send(EvictRequested("e1", "a", Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    assert move.write_snapshot and h.rt("a").state is S.SUSPENDING
    _roll_back(h, move)
    [done] = [a for a in h.plans[-1].actions if isinstance(a, EvictFinished)]
    assert done.error is FULL and done.error.code is Code.RESOURCE_EXHAUSTED
    rt = h.rt("a")
    assert (rt.state, rt.incarnation, rt.evict, rt.at.snapshot) == (
        S.RESIDENT,
        incarnation,
        None,
        False,
    )
    assert not h.moves  # the eviction is not retried on its own
    h.acquire("a")
    assert h.rt("a").state is S.RESIDENT and len(h.grants) == 2  # serves from where it was


def test_after_a_failed_write_the_policy_picks_another_tier_for_a_while() -> None:
    """With no host RAM, a victim goes to disk; after the write failed, the next victim
    choice drops it instead of failing the same write again, until the back-off ends."""
    h = _resident(gpus=(20,), host=0)
    h.register("b", 10)
    h.acquire("b")
    [move] = [m for m in h.moves.values() if isinstance(m, Suspend)]
    assert move.runtime_id == h.rt("a").id and move.level is Tier.DISK
    _roll_back(h, move)
    assert h.rt("a").state is S.SUSPENDING  # planned again at once, to the next tier
    assert isinstance(next(iter(h.moves.values())), Drop)


def test_an_operator_eviction_may_try_the_write_again() -> None:
    h = _resident()
    h.send(EvictRequested("e1", "a", Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    _roll_back(h, move)
    h.send(EvictRequested("e2", "a", Tier.DISK))
    [again] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    assert again.write_snapshot


def test_a_stale_rollback_is_ignored() -> None:
    h = _resident()
    h.send(EvictRequested("e1", "a", Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    h.send(TransitionRolledBack(move.runtime_id, move.seq + 100, FULL))
    assert h.rt("a").state is S.SUSPENDING


def test_a_drain_falls_past_a_failed_snapshot_write() -> None:
    h = _resident(gpus=(40, 40), host=0)
    h.send(DrainRequested("d1", gpu=h.rt("a").gpu, to_tier=Tier.DISK))
    [move] = [a for a in h.plans[-1].actions if isinstance(a, Suspend)]
    _roll_back(h, move)
    assert isinstance(next(iter(h.moves.values())), Drop)  # the next tier down: no worker
    h.settle()
    [done] = [a for p in h.plans for a in p.actions if isinstance(a, EvictFinished)]
    assert done.error is None and h.rt("a").state is S.COLD
