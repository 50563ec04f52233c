"""Starting the one transition that moves a runtime towards a planned residency."""

from __future__ import annotations

from dataclasses import replace

from torpor.scheduler.core.actions import Drop, Load, Resume, Suspend
from torpor.scheduler.core.costs import demote_seconds, prefetch_host_seconds, restore_seconds
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.lifecycle import Residency, RuntimeState
from torpor.scheduler.core.sim import Sim

S = RuntimeState


def start_move(d: Draft, sim: Sim, rid: str, to: Residency) -> bool:
    """Start the op from runtime `rid`'s stable residency to `to` if the bytes it needs are
    free now; emit its action. False (nothing done) when it must wait."""
    rt = d.runtimes[rid]
    if rt.op is not None or rt.at == to or not sim.can_start(rid, to):
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
