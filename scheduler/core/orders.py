"""Operator and prefetch requests: they become orders on runtimes that the pass drives."""

from __future__ import annotations

from dataclasses import replace

from torpor.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, TorporError
from torpor.scheduler.core.actions import DrainStarted, Reject
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.events import DrainRequested, EvictRequested, PrefetchRequested
from torpor.scheduler.core.lifecycle import Tier
from torpor.scheduler.core.scheduler_state import EvictIntent, PrefetchIntent

_EVICT_TIERS = (Tier.HOST, Tier.DEEP, Tier.DISK, Tier.DROP)


def _superseded() -> Aborted:
    return Aborted("superseded by a newer request", reason="SUPERSEDED")


def _deep_disabled() -> FailedPrecondition:
    return FailedPrecondition(
        "deep suspend is disabled on this host ([worker] deep_suspend = false)",
        reason="DEEP_SUSPEND_DISABLED",
    )


def _deadline(d: Draft, timeout_s: float | None) -> float | None:
    return None if timeout_s is None else d.now + timeout_s


def on_evict(d: Draft, ev: EvictRequested) -> None:
    """Order a model's runtime down to a tier (answered by EvictFinished or Reject)."""
    model = d.models.get(ev.model)
    if model is None or model.unregistering:
        d.emit(Reject(ev.request_id, NotFound(f"no model {ev.model!r} is registered")))
        return
    error: TorporError
    if ev.to_tier not in _EVICT_TIERS:
        error = InvalidArgument(f"to_tier must be HOST, DEEP, DISK or DROP, got {ev.to_tier.name}")
        d.emit(Reject(ev.request_id, error))
        return
    if model.spec.pinned:
        error = FailedPrecondition(f"model {ev.model!r} is pinned", reason="PINNED")
        d.emit(Reject(ev.request_id, error))
        return
    if ev.to_tier is Tier.DEEP and not d.config.deep_suspend:
        d.emit(Reject(ev.request_id, _deep_disabled()))
        return
    rt = d.runtimes[model.runtime_id]
    if rt.evict is not None:
        rt = d.end_eviction(rt, _superseded())
    intent = EvictIntent(ev.request_id, ev.to_tier, ev.mode, _deadline(d, ev.drain_timeout_s))
    d.runtimes[rt.id] = replace(rt, evict=intent)


def on_drain(d: Draft, ev: DrainRequested) -> None:
    """Drain a GPU: no new placements there; its unpinned runtimes go down to `to_tier`,
    further down when that tier is full. Undrain only lifts the ban."""
    if ev.gpu not in {g.index for g in d.gpus}:
        error = InvalidArgument(f"no GPU {ev.gpu}; GPUs are {[g.index for g in d.gpus]}")
        d.emit(Reject(ev.request_id, error))
        return
    if ev.undrain:
        d.draining.discard(ev.gpu)
        d.emit(DrainStarted(ev.request_id, ev.gpu, ()))
        return
    if ev.to_tier not in _EVICT_TIERS:
        error = InvalidArgument(f"to_tier must be HOST, DEEP, DISK or DROP, got {ev.to_tier.name}")
        d.emit(Reject(ev.request_id, error))
        return
    if ev.to_tier is Tier.DEEP and not d.config.deep_suspend:
        d.emit(Reject(ev.request_id, _deep_disabled()))
        return
    d.draining.add(ev.gpu)
    moved = []
    for rt in list(d.runtimes.values()):
        if rt.gpu != ev.gpu or d.models[rt.model].spec.pinned or rt.evict is not None:
            continue
        intent = EvictIntent(
            ev.request_id, ev.to_tier, ev.mode, _deadline(d, ev.drain_timeout_s), fallback=True
        )
        d.runtimes[rt.id] = replace(rt, evict=intent)
        moved.append(rt.id)
    d.emit(DrainStarted(ev.request_id, ev.gpu, tuple(sorted(moved))))


def on_prefetch(d: Draft, ev: PrefetchRequested) -> None:
    """Order a runtime up to GPU or HOST (answered by PrefetchDone or Reject)."""
    model = d.models.get(ev.model)
    if model is None or model.unregistering:
        d.emit(Reject(ev.request_id, NotFound(f"no model {ev.model!r} is registered")))
        return
    if ev.tier not in (Tier.GPU, Tier.HOST):
        error = InvalidArgument(f"prefetch tier must be GPU or HOST, got {ev.tier.name}")
        d.emit(Reject(ev.request_id, error))
        return
    rt = d.runtimes[model.runtime_id]
    if rt.prefetch is not None:
        d.emit(Reject(rt.prefetch.request_id, _superseded()))
    d.runtimes[rt.id] = replace(rt, prefetch=PrefetchIntent(ev.request_id, ev.tier))
