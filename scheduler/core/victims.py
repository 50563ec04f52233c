"""Choosing victims: who moves down, to which tier, to free GPU bytes, host bytes or a worker.

Rules (docs/POLICY.md explains them with an example):
- a victim is idle: no lease, no Generate in flight, no op running, no operator or prefetch
  order on it, not pinned; a RESIDENT victim is also past its keep-alive window and older
  than the minimum residency age (against thrashing);
- its tier is the first that has room, in this order: HOST (keeps the context, fastest
  restore), then DISK (a snapshot exists or fits the disk budget), then DROP. HOST may page
  other host-RAM runtimes down (to DISK or DROP) when they are worth less than the victim;
- among idle runtimes the lowest score goes first (`costs.score`): the reuse it loses is its
  decayed rate times the restore time it adds, per GiB freed, plus its priority.
"""

from __future__ import annotations

import enum

from torpor.scheduler.core.accounting import gpu_bytes, host_bytes, host_need, usage
from torpor.scheduler.core.actions import VictimChoice
from torpor.scheduler.core.costs import demote_seconds, restore_seconds, score
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.lifecycle import Residency, RuntimeState, dropped
from torpor.scheduler.core.scheduler_state import Runtime
from torpor.scheduler.core.sim import Sim

S = RuntimeState


class Protection(enum.Enum):
    """Why a runtime is not a victim now."""

    PINNED = "pinned"
    MOVING = "moving"
    ORDERED = "ordered"
    """An operator eviction or a prefetch owns it."""
    LEASED = "leased"
    SERVING = "serving"
    QUEUED = "queued"
    KEEP_ALIVE = "keep_alive"
    YOUNG = "young"


BUSY = frozenset({Protection.LEASED, Protection.SERVING, Protection.QUEUED})
"""Protections that only the runtime's clients end (the starvation cap acts on them)."""


def protection(d: Draft, rt: Runtime) -> Protection | None:
    """Why `rt` cannot be a victim now, or None if it can."""
    model = d.models[rt.model]
    if model.spec.pinned:
        return Protection.PINNED
    if rt.op is not None:
        return Protection.MOVING
    if rt.evict is not None or rt.prefetch is not None:
        return Protection.ORDERED
    if rt.inflight > 0:
        return Protection.SERVING
    if rt.at.state is not S.RESIDENT:
        return None
    if d.leases_on(rt.id):
        return Protection.LEASED
    if d.queues.get(rt.model) and rt.id not in d.closing:
        return Protection.QUEUED
    if model.last_used is not None and d.now < model.last_used + model.keep_alive_s(d.config):
        return Protection.KEEP_ALIVE
    if d.now < rt.since + d.config.min_residency_s:
        return Protection.YOUNG
    return None


def loss(d: Draft, rid: str, frm: Residency, to: Residency, freed: int) -> float:
    """The score of moving runtime `rid` from `frm` down to `to`, freeing `freed` bytes."""
    rt = d.runtimes[rid]
    model = d.models[rt.model]
    fp = model.spec.footprint
    # Restore time it *adds*: for a RESIDENT victim that is the restore from `to`.
    added = restore_seconds(to, fp, d.costs) - restore_seconds(frm, fp, d.costs)
    rate = model.rate.per_second(d.now, d.config.rate_half_life_s)
    return score(rate, added, freed, model.spec.priority, d.config)


def _choice(d: Draft, rid: str, frm: Residency, to: Residency, score_: float) -> VictimChoice:
    fp = d.fp(d.runtimes[rid].model)
    return VictimChoice(
        runtime_id=rid,
        model=d.runtimes[rid].model,
        gpu=frm.gpu,
        frm=frm.state,
        to_tier=to.depth,
        to=to.state,
        gpu_bytes_freed=gpu_bytes(frm, fp) - gpu_bytes(to, fp),
        host_bytes_freed=host_bytes(frm, fp) - host_bytes(to, fp),
        score=score_,
        seconds=demote_seconds(frm, to, fp, d.costs),
    )


def _candidates(d: Draft, sim: Sim, exclude: str, avoid: frozenset[str] = frozenset()) -> list[str]:
    """Runtimes this pass may still move down (idle, stable, not yet chosen)."""
    return [
        rid
        for rid, rt in d.runtimes.items()
        if rid not in sim.touched
        and rid not in avoid
        and rt.model != exclude
        and protection(d, rt) is None
    ]


def _targets(at: Residency, deep_allowed: bool) -> list[Residency]:
    """Where a runtime holding GPU bytes may go, in the order of preference."""
    g, snap = at.gpu, at.snapshot
    host = Residency(S.SUSPENDED_HOST, g, host_copy=True, snapshot=snap)
    deep = Residency(S.SUSPENDED_DEEP, g, host_copy=True, snapshot=snap)
    disk = Residency(S.SUSPENDED_DISK, g, snapshot=True)
    match at.state:
        case S.RESIDENT:
            return [host, disk, dropped(snap)]
        case S.SUSPENDED_HOST:
            return [deep, dropped(snap)] if deep_allowed else [dropped(snap)]
        case S.SUSPENDED_DISK:
            return [dropped(snap)]
    return []


def _write_blocked(d: Draft, rid: str, at: Residency, to: Residency) -> bool:
    """A move that writes a snapshot while a failed write's back-off runs (the store had no
    room): the policy picks another tier rather than fail the same write on every pass.
    An operator's eviction still tries (the operator may have made room)."""
    return to.snapshot and not at.snapshot and d.now < d.runtimes[rid].snapshot_retry_at


def _demote(d: Draft, sim: Sim, rid: str, exclude: str) -> list[VictimChoice] | None:
    """Move `rid` down on `sim` by the tier rule; the moves made, host-RAM victims first."""
    at = sim.proj[rid]
    fp = d.fp(d.runtimes[rid].model)
    for to in _targets(at, d.config.deep_suspend):
        if _write_blocked(d, rid, at, to):
            continue
        moves: list[VictimChoice] = []
        if not sim.fits(rid, to):
            need = host_need(at, to, fp)  # with the staging of a snapshot write
            if need <= 0:
                continue
            # What it loses if it cannot have host RAM: a disk-tier restore.
            disk = Residency(S.SUSPENDED_DISK, at.gpu, snapshot=True)
            bar = loss(d, rid, at, disk, need)
            trial = sim.fork()
            paged = page_host(d, trial, need, bar, exclude, avoid=rid)
            if paged is None or not trial.fits(rid, to):
                continue
            sim.adopt(trial)
            moves = paged
        freed = gpu_bytes(at, fp) - gpu_bytes(to, fp)
        moves.append(_choice(d, rid, at, to, loss(d, rid, at, to, freed)))
        sim.move(rid, to)
        return moves
    return None


def page_host(
    d: Draft, sim: Sim, need: int, bar: float, exclude: str, avoid: str = ""
) -> list[VictimChoice] | None:
    """Page host-RAM runtimes worth less than `bar` down (DISK, else DROP) until `need`
    bytes are free in the host budget; None (and `sim` spoiled) if they are not enough."""
    moves: list[VictimChoice] = []
    while sim.free_host() < need:
        best: tuple[float, str, Residency, Residency] | None = None
        for rid in _candidates(d, sim, exclude):
            at = sim.proj[rid]
            if rid == avoid or at.state not in (S.SUSPENDED_HOST, S.SUSPENDED_DEEP):
                continue
            disk = Residency(S.SUSPENDED_DISK, at.gpu, snapshot=True)
            writable = sim.fits(rid, disk) and not _write_blocked(d, rid, at, disk)
            to = disk if writable else dropped(at.snapshot)
            fp = d.fp(d.runtimes[rid].model)
            s = loss(d, rid, at, to, host_bytes(at, fp) - host_bytes(to, fp))
            if s < bar and (best is None or (s, rid) < (best[0], best[1])):
                best = (s, rid, at, to)
        if best is None:
            return None
        s, rid, at, to = best
        moves.append(_choice(d, rid, at, to, s))
        sim.move(rid, to)
    return moves


def select_gpu_victims(
    d: Draft, sim: Sim, gpu: int, need: int, exclude: str, bar: float | None = None
) -> list[VictimChoice] | None:
    """Move victims down on `sim` until `need` bytes are free on `gpu`; None when the idle
    runtimes are not enough. Greedy, lowest score first (only scores below `bar` when given),
    then pruned: each victim, most valuable first, is spared if the others (or a new greedy
    pick without it) free enough at a lower total score."""
    best_sim = sim.fork()
    best = _greedy(d, best_sim, gpu, need, exclude, bar, frozenset())
    if best is None:
        return None
    spared: frozenset[str] = frozenset()
    for victim in sorted(best, key=lambda v: -v.score):
        if victim.gpu != gpu or victim not in best:
            continue
        trial = sim.fork()
        avoid = spared | {victim.runtime_id}
        other = _greedy(d, trial, gpu, need, exclude, bar, avoid)
        if other is not None and _total(other) < _total(best):
            best, best_sim, spared = other, trial, avoid
    sim.adopt(best_sim)
    return best


def _total(moves: list[VictimChoice]) -> float:
    return sum(v.score for v in moves)


def _greedy(
    d: Draft, sim: Sim, gpu: int, need: int, exclude: str, bar: float | None, avoid: frozenset[str]
) -> list[VictimChoice] | None:
    chosen: list[VictimChoice] = []
    while sim.free_gpu(gpu) < need:
        best: tuple[tuple[float, int, str], Sim, list[VictimChoice]] | None = None
        for rid in _candidates(d, sim, exclude, avoid):
            if sim.proj[rid].gpu != gpu or gpu_bytes(sim.proj[rid], d.fp(rid_model(d, rid))) == 0:
                continue
            trial = sim.fork()
            moves = _demote(d, trial, rid, exclude)
            if not moves or (bar is not None and moves[-1].score >= bar):
                continue
            key = (moves[-1].score, -moves[-1].gpu_bytes_freed, rid)
            if best is None or key < best[0]:
                best = (key, trial, moves)
        if best is None:
            break
        sim.adopt(best[1])
        chosen.extend(best[2])
    if sim.free_gpu(gpu) < need:
        chosen = _deepen(d, sim, gpu, need, chosen)
    return chosen if sim.free_gpu(gpu) >= need else None


def rid_model(d: Draft, rid: str) -> str:
    """The model of a runtime id."""
    return d.runtimes[rid].model


def _deepen(
    d: Draft, sim: Sim, gpu: int, need: int, chosen: list[VictimChoice]
) -> list[VictimChoice]:
    """Still short: turn chosen HOST victims into DEEP ones (their context leaves the GPU
    too), lowest score first, while host RAM has room for the checkpointed context. Where
    deep suspend is off, the context can only leave with the worker: they are dropped."""
    result = list(chosen)
    order = sorted(range(len(result)), key=lambda i: result[i].score)
    for i in order:
        v = result[i]
        if sim.free_gpu(gpu) >= need:
            break
        if v.to is not S.SUSPENDED_HOST or v.gpu != gpu:
            continue
        was = sim.proj[v.runtime_id]
        to = (
            Residency(S.SUSPENDED_DEEP, gpu, host_copy=True, snapshot=was.snapshot)
            if d.config.deep_suspend
            else dropped(was.snapshot)
        )
        if not sim.fits(v.runtime_id, to):
            continue
        frm = d.runtimes[v.runtime_id].at
        fp = d.fp(v.model)
        sim.move(v.runtime_id, to)
        freed = gpu_bytes(frm, fp) - gpu_bytes(to, fp)
        result[i] = _choice(d, v.runtime_id, frm, to, loss(d, v.runtime_id, frm, to, freed))
    return result


def free_worker_slot(
    d: Draft, sim: Sim, exclude: str, bar: float | None = None
) -> list[VictimChoice] | None:
    """Drop the idle worker of lowest score so that a new worker may start (max_workers)."""
    best: tuple[float, str, Residency] | None = None
    for rid in _candidates(d, sim, exclude):
        at = sim.proj[rid]
        if not at.state.has_worker:
            continue
        u = usage(at, d.fp(rid_model(d, rid)))
        s = loss(d, rid, at, dropped(at.snapshot), u.gpu_bytes + u.host)
        if (bar is None or s < bar) and (best is None or (s, rid) < (best[0], best[1])):
            best = (s, rid, at)
    if best is None:
        return None
    s, rid, at = best
    to = dropped(at.snapshot)
    sim.move(rid, to)
    return [_choice(d, rid, at, to, s)]
