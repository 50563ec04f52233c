"""Starting the one transition that moves a runtime towards a planned residency."""

from __future__ import annotations

from dataclasses import replace

from torpor.scheduler.core.accounting import exchange_joint, usage
from torpor.scheduler.core.actions import Drop, Exchange, Load, Resume, Suspend
from torpor.scheduler.core.costs import demote_seconds, prefetch_host_seconds, restore_seconds
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.lifecycle import Residency, RuntimeState
from torpor.scheduler.core.sim import Sim

S = RuntimeState


def in_exchange(d: Draft, rid: str) -> bool:
    """Whether another runtime's exchange op still counts on `rid` as its partner: `rid`
    starts no op of its own until it ends (the pair's joint usage assumes it stays put)."""
    return any(
        rt.op is not None and rt.op.partner == rid
        for other, rt in d.runtimes.items()
        if other != rid
    )


def start_exchange(
    d: Draft, sim: Sim, out: str, out_to: Residency, into: str, into_to: Residency
) -> bool:
    """Start an exchange swap (actions.Exchange) if the pair's joint usage fits now; False
    (nothing done) when it must wait."""
    a, b = d.runtimes[out], d.runtimes[into]
    if a.op is not None or b.op is not None or in_exchange(d, out) or in_exchange(d, into):
        return False
    fp_a, fp_b = d.fp(a.model), d.fp(b.model)
    joint = exchange_joint(
        (a.at, out_to, fp_a), (b.at, into_to, fp_b), d.config.exchange_slack_bytes
    )
    if not sim.can_start_exchange(out, into, joint):
        return False
    sim.start_exchange(out, into, joint)
    start = usage(a.at, fp_a), usage(b.at, fp_b)
    seconds = max(demote_seconds(a.at, out_to, fp_a, d.costs), restore_seconds(b.at, fp_b, d.costs))
    op_out = d.start_op(a, S.SUSPENDING, out_to, out_to.depth, seconds, (into, joint, True))
    op_in = d.start_op(
        d.runtimes[into], S.RESUMING, into_to, b.at.tier, seconds, (out, joint, False)
    )
    assert b.at.gpu is not None
    d.emit(
        Exchange(
            out,
            a.model,
            op_out.seq,
            into,
            b.model,
            op_in.seq,
            b.at.gpu,
            host_slack=max(0, joint.host - start[0].host - start[1].host),
            gpu_slack=max(0, joint.gpu_bytes - start[0].gpu_bytes - start[1].gpu_bytes),
        )
    )
    return True


def start_move(d: Draft, sim: Sim, rid: str, to: Residency) -> bool:
    """Start the op from runtime `rid`'s stable residency to `to` if the bytes it needs are
    free now; emit its action. False (nothing done) when it must wait."""
    rt = d.runtimes[rid]
    if rt.op is not None or rt.at == to or in_exchange(d, rid) or not sim.can_start(rid, to):
        return False
    sim.start(rid, to)
    at, fp = rt.at, d.fp(rt.model)
    if not at.state.has_worker:
        up = restore_seconds if to.state is S.RESIDENT else prefetch_host_seconds
        op = d.start_op(rt, S.LOADING, to, at.tier, up(at, fp, d.costs))
        incarnation = rt.incarnation + 1
        d.runtimes[rid] = replace(d.runtimes[rid], incarnation=incarnation)
        assert to.gpu is not None
        d.emit(Load(rid, rt.model, op.seq, to.gpu, at.tier, to.state, incarnation, to.host_copy))
    elif to.state < at.state:
        # Up the tiers: RESIDENT, or SUSPENDED_HOST for a prefetch from disk.
        up = restore_seconds if to.state is S.RESIDENT else prefetch_host_seconds
        op = d.start_op(rt, S.RESUMING, to, at.tier, up(at, fp, d.costs))
        d.emit(Resume(rid, rt.model, op.seq, at.tier, to.state, to.host_copy))
    else:
        op = d.start_op(rt, S.SUSPENDING, to, to.depth, demote_seconds(at, to, fp, d.costs))
        if to.state.has_worker:
            write = to.snapshot and not at.snapshot
            budget = fp.disk if write else 0
            d.emit(Suspend(rid, rt.model, op.seq, to.state.tier, write, budget))
        else:
            d.emit(Drop(rid, rt.model, op.seq))
    return True
