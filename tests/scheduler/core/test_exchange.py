"""Exchange swaps in the policy (docs/POLICY.md "Exchange swap"): when host RAM cannot hold
both runtimes' copies, a runtime coming back from its host copy trades places with the
resident one (Exchange), instead of sending it to disk or dropping it; when it can, the
copies are retained and a suspend is an unmap."""

from __future__ import annotations

from torpor.errors import Internal
from torpor.scheduler.core import (
    ClientGone,
    Exchange,
    Resume,
    RuntimeState,
    Suspend,
    TransitionCompleted,
    TransitionFailed,
    TransitionRolledBack,
    explain,
)
from torpor.scheduler.core.accounting import exchange_joint, usage

from .harness import GiB, Harness, exchange_sides, world

S = RuntimeState


def _use(h: Harness, model: str) -> None:
    h.acquire(model, client=model)
    h.settle()
    h.send(ClientGone(model))


def _pair(host: float, **config: object) -> Harness:
    """Two 20 GiB models on a 40 GiB GPU that holds one; b used first (it keeps its host
    copy), then a (resident, b suspended to host)."""
    h = Harness(world(gpus=(40,), host=host, disk=0, **config))
    h.register("a", 20)
    h.register("b", 20)
    _use(h, "b")
    _use(h, "a")
    return h


def _exchanges(plan) -> list[Exchange]:
    return [a for a in plan.actions if isinstance(a, Exchange)]


def test_host_ram_for_one_copy_makes_an_exchange() -> None:
    h = _pair(host=24)  # one 20 GiB copy and the 0.5 GiB slack, not two copies
    a, b = h.rt("a"), h.rt("b")
    assert a.at.state is S.RESIDENT and not a.at.host_copy
    assert b.at.state is S.SUSPENDED_HOST and b.at.host_copy
    h.acquire("b", client="b")
    plan = h.plans[-1]
    [ex] = _exchanges(plan)
    assert (ex.out_runtime_id, ex.in_runtime_id, ex.gpu) == (a.id, b.id, 0)
    assert not [x for x in plan.actions if isinstance(x, Suspend | Resume)]
    assert ex.host_slack == h.state.config.exchange_slack_bytes  # same-size copies
    decision = plan.decisions[-1]
    assert "exchange swap with a" in decision.detail
    assert [v.exchange for v in decision.victims] == [True]
    assert h.rt("a").state is S.SUSPENDING and h.rt("b").state is S.RESUMING
    # Both ends reported (the harness reports an exchange's two sides together): b resident
    # without a copy, a on host with one.
    out_side = exchange_sides(ex)[0]
    h.complete(h.moves[(out_side.runtime_id, out_side.seq)])
    assert not h.moves
    a, b = h.rt("a"), h.rt("b")
    assert b.at.state is S.RESIDENT and not b.at.host_copy
    assert a.at.state is S.SUSPENDED_HOST and a.at.host_copy
    assert h.grants  # the waiting request was served
    # And back again.
    h.send(ClientGone("b"))
    h.acquire("a", client="a2")
    [back] = _exchanges(h.plans[-1])
    assert (back.out_runtime_id, back.in_runtime_id) == (b.id, a.id)


def test_host_ram_for_both_copies_keeps_them() -> None:
    h = _pair(host=64)
    assert h.rt("a").at.host_copy  # room for both: a kept its copy at load
    h.acquire("b", client="b")
    plan = h.plans[-1]
    assert not _exchanges(plan)
    assert [type(x) for x in plan.actions if isinstance(x, Suspend | Resume)] == [Suspend]


def test_the_pair_is_counted_once_while_it_runs() -> None:
    """The ledger holds the pair's joint usage (the larger of its two ends as a pair, plus
    the slack), not each side's own peak: two 20 GiB copies never count at once."""
    h = _pair(host=24)
    h.acquire("b", client="b")
    [ex] = _exchanges(h.plans[-1])
    state = h.state
    a, b = state.runtimes[ex.out_runtime_id], state.runtimes[ex.in_runtime_id]
    fa, fb = (state.models[m].spec.footprint for m in ("a", "b"))
    assert a.op is not None and b.op is not None
    joint = exchange_joint((a.at, a.op.to, fa), (b.at, b.op.to, fb), ex.host_slack)
    held_a, held_b = state.held(a), state.held(b)
    assert held_a.host + held_b.host == joint.host <= state.host_budget
    assert held_a.gpu_bytes + held_b.gpu_bytes == joint.gpu_bytes
    assert joint.host == 20 * GiB + ex.host_slack
    # One side done: the other holds what is left of the joint usage.
    out_side = exchange_sides(ex)[0]
    del h.moves[(out_side.runtime_id, out_side.seq)]
    h.send(TransitionCompleted(out_side.runtime_id, out_side.seq))
    state = h.state
    a, b = state.runtimes[ex.out_runtime_id], state.runtimes[ex.in_runtime_id]
    assert a.op is None and b.op is not None
    assert state.held(b).host + usage(a.at, fa).host == joint.host


def test_a_rolled_back_exchange_leaves_both_where_they_were() -> None:
    h = _pair(host=24)
    a, b = h.rt("a"), h.rt("b")
    h.acquire("b", client="b")
    [ex] = _exchanges(h.plans[-1])
    failure = Internal("injected", reason="EXCHANGE_PEER_FAILED")
    for side in exchange_sides(ex):
        del h.moves[(side.runtime_id, side.seq)]
        h.send(TransitionRolledBack(side.runtime_id, side.seq, failure))
    assert h.rt("a").at == a.at and h.rt("b").at == b.at
    # The request still waits, and the policy plans the exchange again.
    [again] = _exchanges(h.plans[-1])
    assert (again.out_runtime_id, again.in_runtime_id) == (a.id, b.id)


def test_a_failed_exchange_fails_both_runtimes() -> None:
    h = _pair(host=24)
    h.acquire("b", client="b")
    [ex] = _exchanges(h.plans[-1])
    failure = Internal("rollback failed too", reason="EXCHANGE_FAILED")
    for side in exchange_sides(ex):
        del h.moves[(side.runtime_id, side.seq)]
        h.send(TransitionFailed(side.runtime_id, side.seq, failure))
    assert h.rt("a").at.state is not S.RESIDENT
    assert h.rt("b").at.state is not S.SUSPENDED_HOST
    h.settle()


def test_explain_names_the_exchange() -> None:
    h = _pair(host=24)
    decision = explain(h.state, "b", h.now)
    assert "exchange swap with a" in decision.detail
    assert [v.exchange for v in decision.victims] == [True]


def test_with_exchanges_off_the_victim_goes_down_instead() -> None:
    h = _pair(host=24, exchange_swap=False)
    h.acquire("b", client="b")
    plan = h.plans[-1]
    assert not _exchanges(plan)
    assert "exchange" not in plan.decisions[-1].detail
