"""The entry points: `step` (an event in, the next state and a plan out) and `explain`."""

from __future__ import annotations

from torpor.errors import Internal, NotFound
from torpor.scheduler.core.actions import Decision, Grant, Plan, Reason, Reject
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.events import (
    AcquireRequested,
    ClientGone,
    CostsUpdated,
    DiskOutsideMeasured,
    DrainRequested,
    Event,
    EvictRequested,
    LeaseReleased,
    ModelRegistered,
    ModelUnregistered,
    PinChanged,
    PrefetchRequested,
    RenewRequested,
    RequestFinished,
    RequestStarted,
    SnapshotDeleted,
    Tick,
    TransitionCompleted,
    TransitionFailed,
    TransitionRolledBack,
    WorkerDied,
)
from torpor.scheduler.core.handlers import (
    on_acquire,
    on_client_gone,
    on_pin,
    on_registered,
    on_released,
    on_renew,
    on_request,
    on_snapshot_deleted,
    on_unregistered,
    snapshot_needed,
)
from torpor.scheduler.core.orders import on_drain, on_evict, on_prefetch
from torpor.scheduler.core.results import (
    on_completed,
    on_failed,
    on_rolled_back,
    on_worker_died,
)
from torpor.scheduler.core.schedule import run_pass
from torpor.scheduler.core.scheduler_state import SchedulerState

EXPLAIN = "explain"
"""Request id and client of the hypothetical Acquire that `explain` plans."""


def _handle(d: Draft, event: Event) -> None:
    match event:
        case AcquireRequested():
            on_acquire(d, event)
        case RenewRequested():
            on_renew(d, event)
        case LeaseReleased():
            on_released(d, event)
        case ClientGone():
            on_client_gone(d, event)
        case RequestStarted() | RequestFinished():
            on_request(d, event)
        case TransitionCompleted():
            on_completed(d, event)
        case TransitionFailed():
            on_failed(d, event)
        case TransitionRolledBack():
            on_rolled_back(d, event)
        case WorkerDied():
            on_worker_died(d, event)
        case ModelRegistered():
            on_registered(d, event)
        case ModelUnregistered():
            on_unregistered(d, event)
        case PinChanged():
            on_pin(d, event)
        case EvictRequested():
            on_evict(d, event)
        case DrainRequested():
            on_drain(d, event)
        case PrefetchRequested():
            on_prefetch(d, event)
        case SnapshotDeleted():
            on_snapshot_deleted(d, event)
        case CostsUpdated():
            d.costs = event.costs
        case DiskOutsideMeasured():
            d.disk_outside = max(0, event.nbytes)
        case Tick():
            pass
        case _:
            raise TypeError(f"not a scheduler event: {event!r}")


def step(state: SchedulerState, event: Event, now: float) -> tuple[SchedulerState, Plan]:
    """Apply one event at time `now`, then plan: the next state and what to do now.

    Pure: `state` is not changed, and the same arguments give the same result. A command
    that is invalid now raises its `TorporError` (see `events`), and then nothing changed.
    `now` must not go backwards between steps (`Internal` if it does): use a monotonic clock.
    """
    if now < state.now:
        raise Internal(f"time went backwards: step at {now} after {state.now}", reason="CLOCK")
    d = Draft(state, now)
    _handle(d, event)
    run_pass(d)
    return d.freeze()


def explain(state: SchedulerState, model: str, now: float, priority: int = 0) -> Decision:
    """The decision an Acquire of `model` would get now, without executing anything.

    It is the real planning code: a hypothetical Acquire is stepped on a copy and the result
    thrown away. Other queued requests rank as they would, so the answer is honest.
    """
    known = state.models.get(model)
    if known is None or known.unregistering:
        raise NotFound(f"no model {model!r} is registered", reason="MODEL_NOT_FOUND")
    request = AcquireRequested(EXPLAIN, model, client=EXPLAIN, priority=priority)
    _, plan = step(state, request, now)
    for action in plan.actions:
        if isinstance(action, Grant) and action.request_id == EXPLAIN:
            detail = f"resident on gpu {action.gpu}"
            fp = state.models[model].spec.footprint
            return Decision(model, Reason.RESIDENT, detail, action.gpu, required_bytes=fp.resident)
        if isinstance(action, Reject) and action.request_id == EXPLAIN:
            # The reject reasons of an Acquire are Reason names (QUEUE_FULL, NEVER_FITS, ...).
            reason = Reason.__members__.get(action.error.reason, Reason.INVALID_ARGUMENT)
            return Decision(model, reason, action.error.message)
    return next(d for d in plan.decisions if d.model == model)


def snapshot_in_use(state: SchedulerState, model: str) -> bool:
    """True when the model's runtime depends on its snapshot (the store must not delete it)."""
    known = state.models.get(model)
    return known is not None and snapshot_needed(state.runtimes[known.runtime_id])
