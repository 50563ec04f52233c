"""Placement: how a model's runtime gets onto a GPU (or into host RAM) from where it is.

A runtime with a live worker resumes on its worker's GPU; one without a worker loads on any
GPU that is not draining. Every admissible GPU is tried on a fork of the pass's `Sim`; the
cheapest option wins (estimated seconds, then total victim score, then GPU index).

Never-fits, decided at once and never queued (FAILED_PRECONDITION):
- NEVER_FITS: the footprint exceeds every GPU's capacity (total minus reserve), or a
  restore from disk stages more than the whole host budget (docs/POLICY.md "Staging buffers");
- BLOCKED_BY_PINNED: on every GPU that is not draining, pinned runtimes leave too little
  room even with every unpinned runtime evicted, or they hold every worker slot. Pins are
  operator decisions that no amount of waiting undoes: queueing would mean waiting forever.
Every GPU that could hold it draining is UNAVAILABLE (NO_GPU): drains are temporary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from torpor.errors import FailedPrecondition, TorporError, Unavailable
from torpor.scheduler.core.accounting import (
    exchange_joint,
    gpu_bytes,
    host_bytes,
    host_need,
    reads_snapshot,
    usage,
)
from torpor.scheduler.core.actions import Decision, Reason, VictimChoice
from torpor.scheduler.core.costs import prefetch_host_seconds, restore_seconds
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.lifecycle import Residency, RuntimeState
from torpor.scheduler.core.scheduler_state import Runtime
from torpor.scheduler.core.sim import Sim
from torpor.scheduler.core.victims import (
    BUSY,
    free_worker_slot,
    page_host,
    protection,
    select_gpu_victims,
)
from torpor.scheduler.core.world import GiB

S = RuntimeState
FATAL = frozenset({Reason.NEVER_FITS, Reason.BLOCKED_BY_PINNED, Reason.NO_GPU})


@dataclass(slots=True)
class Placement:
    """The outcome of placing one model: a decision, and the fork that realizes it."""

    decision: Decision
    sim: Sim | None = None
    target: Residency | None = None
    victims: list[VictimChoice] = field(default_factory=list)
    relocate: bool = False
    """Its worker sits on a GPU it cannot use: drop the worker, then load elsewhere."""
    exchange_with: str | None = None
    """An exchange swap (docs/POLICY.md "Exchange swap"): the victim it trades places with;
    the runtime comes back without keeping its host copy, and that victim's copy is made in
    the pages it gives back."""


def fatal_error(decision: Decision) -> TorporError:
    """The error that answers the queue of a model whose placement is impossible."""
    meta = {"model": decision.model, "required_bytes": decision.required_bytes}
    if decision.reason is Reason.NO_GPU:
        return Unavailable(decision.detail, reason=decision.reason.value, metadata=meta)
    return FailedPrecondition(decision.detail, reason=decision.reason.value, metadata=meta)


def _pinned_blocked(d: Draft, sim: Sim, rt: Runtime, gpu: int) -> bool:
    held = sum(
        gpu_bytes(sim.proj[rid], d.fp(other.model))
        for rid, other in d.runtimes.items()
        if other.model != rt.model
        and sim.proj[rid].gpu == gpu
        and d.models[other.model].spec.pinned
    )
    return sim.caps.gpu[gpu] - held < d.fp(rt.model).resident


def _slots_pinned(d: Draft, sim: Sim, rt: Runtime) -> bool:
    """Would a new worker for `rt` never get a slot, every one being held by a pinned one?"""
    if rt.at.state.has_worker:
        return False
    pinned = sum(
        1
        for rid, other in d.runtimes.items()
        if other.model != rt.model
        and d.models[other.model].spec.pinned
        and sim.proj[rid].state.has_worker
    )
    return pinned >= sim.caps.workers


def place(d: Draft, sim: Sim, model: str, bar: float | None = None) -> Placement:
    """Plan `model`'s runtime onto a GPU; `bar` limits victims to lower scores (prefetch)."""
    rt, fp = d.runtime_of(model), d.fp(model)
    base = Decision(
        model, Reason.QUEUE_BUSY, "", source_tier=rt.at.tier, required_bytes=fp.resident
    )
    largest = max(g.capacity for g in d.gpus)
    if fp.resident > largest:
        detail = (
            f"{model} can never fit: its runtime needs {_size(fp.resident)} on one GPU and the "
            f"largest GPU gives {_size(largest)}"
        )
        return Placement(replace(base, reason=Reason.NEVER_FITS, detail=detail))
    restored = Residency(S.RESIDENT, 0, snapshot=rt.at.snapshot)
    if reads_snapshot(rt.at, restored) and fp.staging > sim.caps.host:
        detail = (
            f"{model} can never be restored from its snapshot: the read stages "
            f"{_size(fp.staging)} in host RAM and the host budget is {_size(sim.caps.host)}"
        )
        return Placement(replace(base, reason=Reason.NEVER_FITS, detail=detail))
    usable = [g.index for g in d.gpus if g.index not in d.draining]
    open_ = [g for g in usable if not _pinned_blocked(d, sim, rt, g)]
    bound = rt.at.gpu if rt.at.state.has_worker else None
    if bound is not None and bound in open_:
        open_ = [bound]
    elif bound is not None and open_:
        detail = f"its worker's GPU {bound} is draining or full of pinned runtimes: moving it"
        return Placement(replace(base, reason=Reason.MOVING, detail=detail), relocate=True)
    if not usable:
        return Placement(replace(base, reason=Reason.NO_GPU, detail="every GPU is draining"))
    if not open_ or _slots_pinned(d, sim, rt):
        detail = "pinned runtimes leave too little room (GPU bytes or worker slots)"
        return Placement(replace(base, reason=Reason.BLOCKED_BY_PINNED, detail=detail))
    options = [p for g in open_ if (p := _best_option(d, sim, rt, g, bar, base)) is not None]
    if not options:
        return _blocked(d, sim, rt, open_, base)
    return min(options, key=_cost)


def _cost(p: Placement) -> tuple[float, float, int]:
    score = sum(v.score for v in p.victims)
    return (p.decision.estimate_s, score, p.decision.gpu or 0)


def _best_option(
    d: Draft, sim: Sim, rt: Runtime, gpu: int, bar: float | None, base: Decision
) -> Placement | None:
    """The cheaper way onto `gpu`: keeping the host copies as they are (a victim's suspend
    is an unmap, or it goes below host RAM), or, for a runtime coming back from its host
    copy, an exchange swap with a victim, when that loses less (docs/POLICY.md "Exchange
    swap": chosen when the host budget cannot hold both copies)."""
    kept = _option(d, sim, rt, gpu, bar, base)
    if not d.config.exchange_swap or rt.at.state is not S.SUSPENDED_HOST or not rt.at.host_copy:
        return kept
    swapped = _option(d, sim, rt, gpu, bar, base, exchange=True)
    if swapped is None or (kept is not None and _score(kept) <= _score(swapped)):
        return kept
    return swapped


def _score(p: Placement) -> float:
    return sum(v.score for v in p.victims)


def _option(
    d: Draft,
    sim: Sim,
    rt: Runtime,
    gpu: int,
    bar: float | None,
    base: Decision,
    exchange: bool = False,
) -> Placement | None:
    """Make room for `rt` on `gpu` on a fork; None if the idle runtimes are not enough.
    `exchange`: as an exchange swap (its host copy is given back as a victim's is made)."""
    trial = sim.fork()
    at, fp = rt.at, d.fp(rt.model)
    moves: list[VictimChoice] = []
    if not at.state.has_worker and trial.free_workers() < 1:
        slot = free_worker_slot(d, trial, rt.model, bar)
        if slot is None:
            return None
        moves += slot
    keep = at.host_copy and not exchange
    target = Residency(S.RESIDENT, gpu, host_copy=keep, snapshot=at.snapshot)
    need = gpu_bytes(target, fp) - (gpu_bytes(trial.proj[rt.id], fp) if at.gpu == gpu else 0)
    # The restore's staging buffers (accounting.py), held while the victims are chosen, so
    # that they go down past host RAM when it has no room for both. An exchange gives its
    # host copy back as the victims' copies are made: they may use that room.
    staging = max(0, host_need(at, target, fp))
    given = host_bytes(at, fp) - host_bytes(target, fp) if exchange else 0
    trial.hold_host(staging - given)
    if trial.free_gpu(gpu) < need:
        victims = select_gpu_victims(d, trial, gpu, need, rt.model, bar)
        if victims is None:
            return None
        moves += victims
    if trial.free_host() < 0:
        short = -trial.free_host()
        paged = page_host(d, trial, short, math.inf if bar is None else bar, rt.model)
        if paged is None:
            return None
        moves += paged
    trial.hold_host(given - staging)  # the move itself counts them (Sim.fits)
    if not at.state.has_worker and _room_for_a_copy(d, trial, rt, target):
        target = replace(target, host_copy=True)  # a host copy makes its next suspend cheap
    partner = _partner(d, trial, moves, gpu) if exchange else None
    if exchange:
        if partner is None:
            return None
        if not _exchange_fits(d, trial, partner, rt.id, target):
            return None
    elif not trial.fits(rt.id, target):
        return None
    trial.move(rt.id, target)
    restore = restore_seconds(at, fp, d.costs)
    if partner is not None:  # the victim's copy is made while this one comes back
        swapped = next(m for m in moves if m.runtime_id == partner)
        restore = max(restore, swapped.seconds)
        moves = [replace(m, exchange=True) if m.runtime_id == partner else m for m in moves]
    estimate = sum(m.seconds for m in moves if not m.exchange) + restore
    reason = Reason.EVICT if moves else Reason.FITS
    detail = f"fits on gpu {gpu}" + (f" after moving {len(moves)} runtime(s)" if moves else "")
    if partner is not None:
        detail += f", by an exchange swap with {d.runtimes[partner].model}"
    decision = replace(
        base, reason=reason, detail=detail, gpu=gpu, victims=tuple(moves), estimate_s=estimate
    )
    return Placement(decision, trial, target, moves, exchange_with=partner)


def _partner(d: Draft, trial: Sim, moves: list[VictimChoice], gpu: int) -> str | None:
    """The victim an exchange trades places with: the largest one on `gpu` that goes from
    RESIDENT, without a host copy, to SUSPENDED_HOST (whose copy is made in the incoming
    runtime's pages); None if there is none."""
    best: tuple[int, str] | None = None
    for m in moves:
        was = d.runtimes[m.runtime_id].at
        if m.gpu != gpu or was.state is not S.RESIDENT or was.host_copy:
            continue
        if trial.proj[m.runtime_id].state is not S.SUSPENDED_HOST:
            continue
        key = (d.fp(m.model).weights, m.runtime_id)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def _exchange_fits(d: Draft, trial: Sim, out: str, into: str, target: Residency) -> bool:
    """Whether the exchange of `out` (planned on `trial` at SUSPENDED_HOST already) and
    `into` (to `target`) fits as a pair: the projection with both at their ends, and their
    joint usage while they trade places."""
    was_out = d.runtimes[out].at
    fp_out, fp_in = d.fp(d.runtimes[out].model), d.fp(d.runtimes[into].model)
    to_out = trial.proj[out]
    joint = exchange_joint(
        (was_out, to_out, fp_out), (trial.proj[into], target, fp_in), d.config.exchange_slack_bytes
    )
    ends = (usage(to_out, fp_out), usage(target, fp_in))
    probe = trial.fork()
    probe.move(into, target)
    return probe.fits_exchange(joint, ends)


def _room_for_a_copy(d: Draft, trial: Sim, rt: Runtime, target: Residency) -> bool:
    """Whether a loading runtime may keep a host copy: it fits, and it leaves room for the
    largest staging of any model. A resident runtime's copy is never paged out, so copies
    that filled the host budget would leave no room for a restore's staging buffers, and a
    restore from disk would wait forever (docs/POLICY.md "Staging buffers")."""
    with_copy = replace(target, host_copy=True)
    if not trial.fits(rt.id, with_copy):
        return False
    fp = d.fp(rt.model)
    kept = host_bytes(with_copy, fp) - host_bytes(rt.at, fp)
    headroom = max((d.fp(m).staging for m in d.models), default=0)
    return trial.free_host() - kept >= headroom


def _blocked(d: Draft, sim: Sim, rt: Runtime, gpus: list[int], base: Decision) -> Placement:
    """No room now: name the busy runtimes it waits for on its most promising GPU."""

    def busy_on(gpu: int) -> list[str]:
        return [
            rid
            for rid, other in d.runtimes.items()
            if other.model != rt.model
            and sim.proj[rid].gpu == gpu
            and other.at.state is S.RESIDENT
            and protection(d, other) in BUSY
        ]

    def potential(gpu: int) -> int:
        held = sum(gpu_bytes(sim.proj[r], d.fp(d.runtimes[r].model)) for r in busy_on(gpu))
        return sim.free_gpu(gpu) + held

    gpu = max(gpus, key=lambda g: (potential(g), -g))
    blockers = tuple(sorted(busy_on(gpu)))
    what = f"waits for {len(blockers)} busy runtime(s)" if blockers else "victims are protected"
    detail = f"no room on gpu {gpu}: {what}"
    estimate = restore_seconds(rt.at, d.fp(rt.model), d.costs)
    return Placement(replace(base, detail=detail, gpu=gpu, blockers=blockers, estimate_s=estimate))


def place_host(d: Draft, sim: Sim, model: str, bar: float) -> Placement | None:
    """Plan a Prefetch(HOST): the weights into pinned host RAM, the worker's context on a
    GPU with free room. Only host runtimes worth less than `bar` are paged out for it; no
    GPU runtime is evicted. None when there is no such room.

    From SUSPENDED_DISK the snapshot is read straight into the host copy (the context is
    already on its GPU). From COLD or SNAPSHOT the worker builds the engine on the GPU and
    suspends it to host in the same call, so the GPU needs free room for the whole resident
    footprint while it loads (accounting.transition_usage)."""
    rt, fp = d.runtime_of(model), d.fp(model)
    at = rt.at
    trial = sim.fork()
    moves: list[VictimChoice] = []
    if at.state is S.SUSPENDED_DISK:
        assert at.gpu is not None
        gpus = [at.gpu] if at.gpu not in d.draining else []
    else:
        if trial.free_workers() < 1:
            return None  # a prefetch takes only a free worker slot
        gpus = [
            g.index
            for g in d.gpus
            if g.index not in d.draining and trial.free_gpu(g.index) >= fp.resident
        ]
    gpus = sorted(gpus, key=lambda g: (-trial.free_gpu(g), g))
    if not gpus:
        return None
    target = Residency(S.SUSPENDED_HOST, gpus[0], host_copy=True, snapshot=at.snapshot)
    need = host_need(at, target, fp)  # the host copy, and the staging of a disk read
    if trial.free_host() < need:
        paged = page_host(d, trial, need, bar, model)
        if paged is None:
            return None
        moves += paged
    if not trial.fits(rt.id, target):
        return None
    trial.move(rt.id, target)
    estimate = sum(m.seconds for m in moves) + prefetch_host_seconds(at, fp, d.costs)
    decision = Decision(
        model,
        Reason.EVICT if moves else Reason.FITS,
        "prefetch into host RAM",
        gpu=target.gpu,
        victims=tuple(moves),
        estimate_s=estimate,
        source_tier=at.tier,
        required_bytes=fp.resident,
    )
    return Placement(decision, trial, target, moves)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"
