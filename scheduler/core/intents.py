"""Orders that outlive one step: operator evictions (and drains), and prefetches.

Each is stored on its runtime and re-examined on every pass until it is done, rejected or
(for DRAIN mode) times out.
"""

from __future__ import annotations

from dataclasses import replace

from torpor.errors import Aborted, ResourceExhausted
from torpor.scheduler.core.actions import (
    AbortRequests,
    LeaseEnd,
    PrefetchDone,
    Reject,
)
from torpor.scheduler.core.costs import restore_seconds, score
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.lifecycle import EvictMode, Residency, RuntimeState, Tier, dropped
from torpor.scheduler.core.ops import start_move
from torpor.scheduler.core.placement import Placement, place, place_host
from torpor.scheduler.core.scheduler_state import EvictIntent, Runtime
from torpor.scheduler.core.sim import Sim

S = RuntimeState
_CHAIN = (Tier.HOST, Tier.DEEP, Tier.DISK, Tier.DROP)


def drive_evictions(d: Draft, sim: Sim) -> None:
    """Advance every operator eviction that can advance."""
    for rt in list(d.runtimes.values()):
        if rt.evict is None or rt.op is not None:
            continue
        if rt.at.depth >= rt.evict.to_tier:
            _finish_eviction(d, rt)
            continue
        to = _evict_target(sim, rt, rt.evict, d.config.deep_suspend, d.now)
        if to is None:
            _reject_eviction(d, rt, f"no room in tier {rt.evict.to_tier.name} for {rt.model}")
            continue
        if d.leases_on(rt.id) or rt.inflight:
            if rt.evict.mode is EvictMode.DRAIN:
                continue  # wait for them (the deadline is checked by the pass's expiry)
            _abort_users(d, rt)
        sim.move(rt.id, to)
        start_move(d, sim, rt.id, to)


def _finish_eviction(d: Draft, rt: Runtime) -> None:
    d.end_eviction(rt)
    if d.models[rt.model].unregistering and not rt.at.state.has_worker:
        del d.runtimes[rt.id]
        del d.models[rt.model]


def _reject_eviction(d: Draft, rt: Runtime, detail: str) -> None:
    d.end_eviction(rt, ResourceExhausted(detail, reason="TIER_FULL"))


def _abort_users(d: Draft, rt: Runtime) -> None:
    """ABORT: revoke the runtime's leases and abort its in-flight requests first."""
    error = Aborted(f"runtime of {rt.model} is being evicted", reason="EVICTED")
    for lease in d.leases_on(rt.id):
        d.end_lease(lease, LeaseEnd.REVOKED, error)
    if rt.inflight:
        d.emit(AbortRequests(rt.id, rt.model))


def _evict_target(
    sim: Sim, rt: Runtime, intent: EvictIntent, deep_allowed: bool, now: float
) -> Residency | None:
    """The residency for the ordered tier, or (for drains) the next one down that has room.
    A drain also passes over a snapshot write while a failed one's back-off runs."""
    at = rt.at
    start = _CHAIN.index(intent.to_tier)
    tiers = _CHAIN[start:] if intent.fallback else _CHAIN[start : start + 1]
    for tier in tiers:
        if tier is Tier.DEEP and not deep_allowed:
            continue
        match tier:
            case Tier.HOST:
                to = Residency(S.SUSPENDED_HOST, at.gpu, host_copy=True, snapshot=at.snapshot)
            case Tier.DEEP:
                to = Residency(S.SUSPENDED_DEEP, at.gpu, host_copy=True, snapshot=at.snapshot)
            case Tier.DISK:
                to = Residency(S.SUSPENDED_DISK, at.gpu, snapshot=True)
            case _:
                to = dropped(at.snapshot)
        writes = to.snapshot and not at.snapshot
        if intent.fallback and writes and now < rt.snapshot_retry_at:
            continue
        if to.depth > at.depth and sim.fits(rt.id, to):
            return to
    return None


def _satisfied(at: Residency, tier: Tier) -> bool:
    if tier is Tier.GPU:
        return at.state is S.RESIDENT
    return at.state in (S.RESIDENT, S.SUSPENDED_HOST, S.SUSPENDED_DEEP)


def drive_prefetches(d: Draft, sim: Sim) -> None:
    """Advance prefetches, after every queued request had its turn (they have precedence)."""
    for rt in list(d.runtimes.values()):
        intent = rt.prefetch
        if intent is None or rt.op is not None:
            continue
        if _satisfied(rt.at, intent.tier):
            d.emit(PrefetchDone(intent.request_id, rt.model, rt.at.state))
            d.runtimes[rt.id] = replace(rt, prefetch=None)
            d.touch(rt.model)  # its keep-alive starts now, giving the client time to come
            continue
        if d.queues.get(rt.model):
            continue  # a real request places it
        p = _prefetch_placement(d, sim, rt, intent.tier)
        if p is None or p.sim is None or p.target is None or p.relocate:
            error = ResourceExhausted(
                f"no free or lower-value room to prefetch {rt.model} to {intent.tier.name}",
                reason="NO_ROOM",
            )
            d.emit(Reject(intent.request_id, error))
            d.runtimes[rt.id] = replace(rt, prefetch=None)
            continue
        d.decide(p.decision)
        sim.adopt(p.sim)
        for v in p.victims:
            start_move(d, sim, v.runtime_id, sim.proj[v.runtime_id])
        start_move(d, sim, rt.id, p.target)


def _prefetch_placement(d: Draft, sim: Sim, rt: Runtime, tier: Tier) -> Placement | None:
    """Only victims worth less than the prefetched runtime itself (its own score if it were
    the victim) make room for it: a prefetch never pushes out something more valuable."""
    model = d.models[rt.model]
    fp = model.spec.footprint
    rate = model.rate.per_second(d.now, d.config.rate_half_life_s)
    if tier is Tier.GPU:
        restore = restore_seconds(rt.at, fp, d.costs)
        bar = score(rate, restore, fp.resident, model.spec.priority, d.config)
        p = place(d, sim, rt.model, bar)
        return p if p.decision.admit else None
    host = Residency(S.SUSPENDED_HOST, 0, host_copy=True)
    saved = restore_seconds(rt.at, fp, d.costs) - restore_seconds(host, fp, d.costs)
    bar = score(rate, saved, fp.weights, model.spec.priority, d.config)
    return place_host(d, sim, rt.model, bar)
