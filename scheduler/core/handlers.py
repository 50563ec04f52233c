"""How each request or command changes the Draft (before the step's scheduling pass).

Results of actions (TransitionCompleted/Failed, WorkerDied) are in `results.py`.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

from torpor.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TorporError,
)
from torpor.scheduler.core.actions import (
    Decision,
    LeaseEnd,
    Reason,
    Reject,
    Renewed,
)
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.events import (
    AcquireRequested,
    ClientGone,
    LeaseReleased,
    ModelRegistered,
    ModelUnregistered,
    PinChanged,
    RenewRequested,
    RequestFinished,
    RequestStarted,
    SnapshotDeleted,
)
from torpor.scheduler.core.lifecycle import EvictMode, RuntimeState, Tier
from torpor.scheduler.core.scheduler_state import EvictIntent, Model, Runtime, Waiter, new_runtime

S = RuntimeState


def model_or_raise(d: Draft, name: str) -> Model:
    """The registered model `name`, or NotFound."""
    model = d.models.get(name)
    if model is None or model.unregistering:
        raise NotFound(f"no model {name!r} is registered", reason="MODEL_NOT_FOUND")
    return model


def on_registered(d: Draft, ev: ModelRegistered) -> None:
    """Add a model and its runtime (SNAPSHOT when a snapshot is already in the store)."""
    if ev.spec.name in d.models:
        raise AlreadyExists(f"model {ev.spec.name!r} is already registered")
    runtime_id = f"{ev.spec.name}#{d.number()}"
    d.models[ev.spec.name] = Model(ev.spec, runtime_id)
    d.runtimes[runtime_id] = new_runtime(runtime_id, ev.spec.name, ev.has_snapshot, d.now)


def on_unregistered(d: Draft, ev: ModelUnregistered) -> None:
    """Remove a model; its worker (if any) is dropped first, its queue gets NOT_FOUND.
    Refused while it holds leases or runs requests (their ends would name a lost model)."""
    model = model_or_raise(d, ev.model)
    rt = d.runtimes[model.runtime_id]
    if d.leases_on(rt.id) or rt.inflight:
        raise FailedPrecondition(
            f"model {ev.model!r} holds {len(d.leases_on(rt.id))} lease(s) and runs "
            f"{rt.inflight} request(s)",
            reason="IN_USE",
        )
    gone = NotFound(f"model {ev.model!r} was unregistered", reason="MODEL_UNREGISTERED")
    d.reject_queue(ev.model, gone)
    rt = d.end_eviction(rt, gone)
    if rt.prefetch is not None:
        d.emit(Reject(rt.prefetch.request_id, gone))
    if rt.op is None and not rt.at.state.has_worker:
        del d.runtimes[rt.id]
        del d.models[ev.model]
        return
    d.models[ev.model] = replace(model, unregistering=True)
    drop = EvictIntent(None, Tier.DROP, EvictMode.ABORT, None)
    d.runtimes[rt.id] = replace(rt, evict=drop, prefetch=None)


def on_acquire(d: Draft, ev: AcquireRequested) -> None:
    """Queue an Acquire (the pass grants it at once if its runtime is resident)."""
    model = d.models.get(ev.model)
    error: TorporError
    if model is None or model.unregistering:
        error = NotFound(f"no model {ev.model!r} is registered", reason="MODEL_NOT_FOUND")
        return _refuse(d, ev, Reason.NOT_FOUND, error)
    queue = d.queues.setdefault(ev.model, [])
    if ev.deadline is not None and ev.deadline <= d.now:
        error = DeadlineExceeded(
            f"the deadline of the request for {ev.model} has passed", reason="DEADLINE"
        )
        return _refuse(d, ev, Reason.DEADLINE, error)
    if len(queue) >= d.config.queue_bound:
        error = ResourceExhausted(
            f"{len(queue)} requests already wait for {ev.model} (queue_bound)",
            reason="QUEUE_FULL",
            metadata={"model": ev.model, "queue_bound": d.config.queue_bound},
        )
        return _refuse(d, ev, Reason.QUEUE_FULL, error)
    ttl = ev.lease_ttl_s if ev.lease_ttl_s is not None else d.config.lease_ttl_s
    if not ttl > 0:
        error = InvalidArgument(f"lease_ttl_s must be > 0, got {ttl}", reason="BAD_LEASE_TTL")
        return _refuse(d, ev, Reason.INVALID_ARGUMENT, error)
    rt = d.runtimes[model.runtime_id]
    d.models[ev.model] = replace(model, rate=model.rate.bump(d.now, d.config.rate_half_life_s))
    waiter = Waiter(
        request_id=ev.request_id,
        model=ev.model,
        client=ev.client,
        priority=model.spec.priority + ev.priority,
        enqueued_at=d.now,
        deadline=ev.deadline,
        lease_ttl_s=min(ttl, d.config.lease_max_ttl_s),
        arrived_tier=rt.at.tier,
        order=d.number(),
    )
    bisect.insort(queue, waiter, key=Waiter.rank)


def _refuse(d: Draft, ev: AcquireRequested, reason: Reason, error: TorporError) -> None:
    d.emit(Reject(ev.request_id, error))
    d.decide(Decision(ev.model, reason, error.message))


def on_renew(d: Draft, ev: RenewRequested) -> None:
    """Extend a lease from now."""
    lease = d.leases.get(ev.lease_id)
    if lease is None:
        raise NotFound(f"lease {ev.lease_id!r} expired or was released", reason="LEASE_NOT_FOUND")
    ttl = lease.ttl_s if ev.ttl_s is None else min(ev.ttl_s, d.config.lease_max_ttl_s)
    if not ttl > 0:
        raise InvalidArgument(f"ttl_s must be > 0, got {ev.ttl_s}", reason="BAD_LEASE_TTL")
    d.leases[lease.id] = replace(lease, expires_at=d.now + ttl)
    d.emit(Renewed(lease.id, d.now + ttl))


def on_released(d: Draft, ev: LeaseReleased) -> None:
    """The holder gave a lease back."""
    lease = d.leases.get(ev.lease_id)
    if lease is None:
        raise NotFound(f"lease {ev.lease_id!r} expired or was released", reason="LEASE_NOT_FOUND")
    d.end_lease(lease, LeaseEnd.RELEASED)
    d.touch(lease.model)


def on_client_gone(d: Draft, ev: ClientGone) -> None:
    """End the client's leases and cancel its queued requests."""
    for lease in [x for x in d.leases.values() if x.client == ev.client]:
        d.end_lease(lease, LeaseEnd.CLIENT_GONE)
        d.touch(lease.model)
    for queue in d.queues.values():
        for w in [w for w in queue if w.client == ev.client]:
            queue.remove(w)
            d.emit(Reject(w.request_id, Cancelled(f"client {ev.client} went away")))


def on_request(d: Draft, ev: RequestStarted | RequestFinished) -> None:
    """Count Generate calls in flight on a runtime (it is busy while any runs)."""
    model = model_or_raise(d, ev.model)
    rt = d.runtimes[model.runtime_id]
    delta = 1 if isinstance(ev, RequestStarted) else -1
    if rt.inflight + delta < 0:
        raise Internal(f"RequestFinished without RequestStarted for {ev.model}")
    d.runtimes[rt.id] = replace(rt, inflight=rt.inflight + delta)
    d.touch(ev.model)


def on_pin(d: Draft, ev: PinChanged) -> None:
    """Pin or unpin a model. Pinning cancels an operator eviction that has not started:
    the newer order wins, and a pinned runtime is never moved off its GPU."""
    model = model_or_raise(d, ev.model)
    d.models[ev.model] = replace(model, spec=replace(model.spec, pinned=ev.pinned))
    rt = d.runtimes[model.runtime_id]
    # An eviction already suspending the runtime cannot be called back; any other order
    # (waiting for leases to drain, or behind a load or resume in progress) is cancelled.
    suspending = rt.op is not None and rt.op.state is S.SUSPENDING
    if ev.pinned and rt.evict is not None and not suspending:
        d.end_eviction(rt, FailedPrecondition(f"model {ev.model!r} was pinned", reason="PINNED"))


def snapshot_needed(rt: Runtime) -> bool:
    """Does the runtime restore, or is it about to rest, on its snapshot?"""
    if not rt.at.snapshot:
        return False
    if rt.at.state is S.SUSPENDED_DISK:
        return True
    op = rt.op
    return op is not None and (
        op.source is Tier.DISK or op.to.state in (S.SUSPENDED_DISK, S.SNAPSHOT)
    )


def on_snapshot_deleted(d: Draft, ev: SnapshotDeleted) -> None:
    """Forget a deleted snapshot; refuse if a runtime depends on it."""
    rt = d.runtimes[model_or_raise(d, ev.model).runtime_id]
    if snapshot_needed(rt):
        raise FailedPrecondition(
            f"runtime {rt.id} is {rt.state.name} and depends on its snapshot",
            reason="SNAPSHOT_IN_USE",
        )
    if not rt.at.snapshot:
        return
    if rt.at.state is S.SNAPSHOT:
        d.settle(rt, replace(rt.at, state=S.COLD, snapshot=False))
        return
    op = rt.op and replace(rt.op, to=replace(rt.op.to, snapshot=False))
    d.runtimes[rt.id] = replace(rt, at=replace(rt.at, snapshot=False), op=op)
