"""The scheduling pass that ends every step.

Order, and why:
1. expire deadlines, leases and timed-out drains (time first: nothing stale is planned for);
2. grant every queued request of a RESIDENT runtime that is not yielding: serving queued work
   for resident models before swapping anything is the cheapest thing to do;
3. advance operator evictions and drains;
4. place waiting models, highest-ranked head request first, each in the projected world left
   by the ones before it (so two models never count the same free bytes);
5. advance prefetches (after real requests);
6. decide which busy runtimes must yield (the starvation cap; steps 2-4 used the last
   pass's answer), grant again for those that stopped yielding, and when to wake up.
"""

from __future__ import annotations

from dataclasses import replace

from torpor.errors import DeadlineExceeded
from torpor.scheduler.core.actions import Decision, Grant, LeaseEnd, Reason, Reject
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.intents import drive_evictions, drive_prefetches
from torpor.scheduler.core.lifecycle import EvictMode, RuntimeState, dropped
from torpor.scheduler.core.ops import start_exchange, start_move
from torpor.scheduler.core.placement import FATAL, fatal_error, place
from torpor.scheduler.core.scheduler_state import Lease, Runtime, Waiter
from torpor.scheduler.core.sim import Sim

S = RuntimeState


def run_pass(d: Draft) -> None:
    """Plan everything that can be planned now (see the module docstring)."""
    expire(d)
    grant_ready(d)
    sim = Sim(d)
    drive_evictions(d, sim)
    blocked = [m for m in _by_rank(d) if _place_waiting(d, sim, m) is Reason.QUEUE_BUSY]
    drive_prefetches(d, sim)
    was_closing = d.closing
    _update_contention(d, blocked)
    if was_closing - d.closing:
        grant_ready(d)  # runtimes that stopped yielding serve their queue now, not next event
    d.wake_at = _next_wake(d, bool(blocked))


def expire(d: Draft) -> None:
    """Reject queued requests past their deadline, end expired leases, time out drains."""
    for model, queue in list(d.queues.items()):
        keep = []
        for w in queue:
            if w.deadline is not None and w.deadline <= d.now:
                waited = d.now - w.enqueued_at
                error = DeadlineExceeded(
                    f"{model} was not ready before the deadline (queued {waited:.3f} s)",
                    reason="DEADLINE",
                    metadata={"model": model, "waited_s": f"{waited:.3f}"},
                )
                d.emit(Reject(w.request_id, error))
            else:
                keep.append(w)
        d.queues[model] = keep
    for lease in [x for x in d.leases.values() if x.expires_at <= d.now]:
        d.end_lease(lease, LeaseEnd.EXPIRED)
    for rt in list(d.runtimes.values()):
        intent = rt.evict
        if intent is None or rt.op is not None or intent.mode is not EvictMode.DRAIN:
            continue
        timed_out = intent.deadline is not None and intent.deadline <= d.now
        if timed_out and rt.at.depth < intent.to_tier:
            error = DeadlineExceeded(
                f"{rt.model} still had leases or requests at the drain timeout",
                reason="DRAIN_TIMEOUT",
            )
            d.end_eviction(rt, error)


def _grantable(d: Draft, rt: Runtime) -> bool:
    return (
        rt.op is None
        and rt.at.state is S.RESIDENT
        and rt.evict is None
        and rt.id not in d.closing
        and not d.models[rt.model].unregistering
    )


def grant_ready(d: Draft) -> None:
    """Grant every queued request of a resident runtime that is not yielding."""
    for model in list(d.queues):
        rt = d.runtime_of(model)
        if not d.queues[model] or not _grantable(d, rt):
            continue
        for w in d.queues.pop(model):
            grant(d, rt, w)
        fp = d.fp(model)
        detail = f"resident on gpu {rt.at.gpu}"
        d.decide(Decision(model, Reason.RESIDENT, detail, rt.at.gpu, required_bytes=fp.resident))


def grant(d: Draft, rt: Runtime, w: Waiter) -> None:
    """Lease a resident runtime to a waiter."""
    assert rt.at.gpu is not None
    lease_id = f"lease-{d.number()}"
    expires = d.now + w.lease_ttl_s
    d.leases[lease_id] = Lease(
        lease_id, w.request_id, w.client, rt.model, rt.id, d.now, expires, w.lease_ttl_s
    )
    d.emit(Grant(w.request_id, rt.model, rt.id, rt.at.gpu, lease_id, expires, w.arrived_tier))
    d.touch(rt.model)
    if rt.id in d.blocking:
        # Served while another model waits for this room: the starvation cap counts it.
        rt = d.runtimes[rt.id]
        d.runtimes[rt.id] = replace(rt, contended_grants=rt.contended_grants + 1)


def _by_rank(d: Draft) -> list[str]:
    return sorted((m for m, q in d.queues.items() if q), key=lambda m: d.queues[m][0].rank())


def _place_waiting(d: Draft, sim: Sim, model: str) -> Reason:
    """Plan the model of a waiting queue and start what can start; its decision's reason."""
    rt = d.runtime_of(model)
    if rt.op is not None:
        decision = _in_transition(d, rt)
    elif rt.at.state is S.RESIDENT:
        decision = _resident(d, rt)
    else:
        decision = _place(d, sim, rt)
    d.decide(decision)
    return decision.reason


def _in_transition(d: Draft, rt: Runtime) -> Decision:
    assert rt.op is not None
    reason = Reason.IN_PROGRESS if rt.op.to.state is S.RESIDENT else Reason.MOVING
    return Decision(
        rt.model,
        reason,
        f"{rt.op.state.name.lower()} from {rt.op.source.name}",
        rt.gpu,
        estimate_s=rt.op.estimate_s,
        source_tier=rt.op.source,
        required_bytes=d.fp(rt.model).resident,
    )


def _resident(d: Draft, rt: Runtime) -> Decision:
    """A resident runtime with a queue: its order ended in this pass, or it is yielding."""
    required = d.fp(rt.model).resident
    if _grantable(d, rt):
        for w in d.queues.pop(rt.model):
            grant(d, rt, w)
        return Decision(rt.model, Reason.RESIDENT, "resident", rt.at.gpu, required_bytes=required)
    why = "an operator eviction" if rt.evict else "a starving model"
    detail = f"resident, but yielding to {why}"
    return Decision(rt.model, Reason.QUEUE_YIELDING, detail, rt.at.gpu, required_bytes=required)


def _place(d: Draft, sim: Sim, rt: Runtime) -> Decision:
    """Place a runtime that is not resident, and start the moves that can start now."""
    p = place(d, sim, rt.model)
    if p.decision.reason in FATAL:
        d.reject_queue(rt.model, fatal_error(p.decision))
    elif p.relocate:
        sim.move(rt.id, dropped(rt.at.snapshot))
        start_move(d, sim, rt.id, dropped(rt.at.snapshot))
    elif p.sim is not None and p.target is not None:
        sim.adopt(p.sim)
        for v in p.victims:
            if v.runtime_id != p.exchange_with:
                start_move(d, sim, v.runtime_id, sim.proj[v.runtime_id])
        if p.exchange_with is not None:
            out = p.exchange_with
            start_exchange(d, sim, out, sim.proj[out], rt.id, p.target)
        else:
            start_move(d, sim, rt.id, p.target)
    return p.decision


def _update_contention(d: Draft, blocked: list[str]) -> None:
    """Busy runtimes that waiting models need room from yield (take no new leases) once a
    waiting head request waited `starvation_wait_s`, or once they got `starvation_cap`
    grants while it waited. Every queued request is thus served eventually."""
    blocking: set[str] = set()
    closing: set[str] = set()
    for model in blocked:
        head = d.queues[model][0]
        starving = d.now - head.enqueued_at >= d.config.starvation_wait_s
        for rid in d.decisions[model].blockers:
            blocking.add(rid)
            if starving or d.runtimes[rid].contended_grants >= d.config.starvation_cap:
                closing.add(rid)
    for rid, rt in d.runtimes.items():
        if rid not in blocking and rt.contended_grants:
            d.runtimes[rid] = replace(rt, contended_grants=0)
    d.blocking, d.closing = frozenset(blocking), frozenset(closing)


def _next_wake(d: Draft, blocked: bool) -> float | None:
    """The earliest time at which a time-bound rule changes its answer."""
    times = [w.deadline for q in d.queues.values() for w in q if w.deadline is not None]
    times += [lease.expires_at for lease in d.leases.values()]
    times += [
        rt.evict.deadline
        for rt in d.runtimes.values()
        if rt.evict is not None and rt.evict.deadline is not None
    ]
    if blocked:
        # Protections that end by themselves, and starvation thresholds.
        for rt in d.runtimes.values():
            if rt.at.state is S.RESIDENT and rt.op is None:
                model = d.models[rt.model]
                times.append(rt.since + d.config.min_residency_s)
                if model.last_used is not None:
                    times.append(model.last_used + model.keep_alive_s(d.config))
        times += [q[0].enqueued_at + d.config.starvation_wait_s for q in d.queues.values() if q]
    future = [t for t in times if t > d.now]
    return min(future) if future else None
