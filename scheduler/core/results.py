"""How results of actions change the Draft: a transition completed or failed, a worker died.

A result whose `seq` (or `incarnation`) does not match the runtime's current op (or worker)
is stale: it raced a WorkerDied or an unregister, and is ignored.
"""

from __future__ import annotations

from dataclasses import replace

from torpor.errors import Internal, Unavailable
from torpor.scheduler.core.actions import LeaseEnd, Reject
from torpor.scheduler.core.draft import Draft
from torpor.scheduler.core.events import (
    TransitionCompleted,
    TransitionFailed,
    TransitionRolledBack,
    WorkerDied,
)
from torpor.scheduler.core.lifecycle import Residency, RuntimeState
from torpor.scheduler.core.scheduler_state import Runtime

S = RuntimeState

SNAPSHOT_RETRY_S = 60.0
"""After a snapshot write failed for want of room, the policy plans no new one for that
runtime for this long: as a victim it goes to another tier (or is dropped) meanwhile,
instead of retrying a write that fails again on every pass. Operator evictions still try."""


def _current(d: Draft, runtime_id: str, seq: int) -> Runtime | None:
    rt = d.runtimes.get(runtime_id)
    if rt is None or rt.op is None or rt.op.seq != seq:
        return None
    return rt


def on_completed(d: Draft, ev: TransitionCompleted) -> None:
    """The runtime reached its op's target."""
    rt = _current(d, ev.runtime_id, ev.seq)
    if rt is None or rt.op is None:
        return
    to = rt.op.to
    if ev.state is not None and ev.state is not to.state:
        raise Internal(
            f"runtime {rt.id}: worker reports {ev.state.name}, plan expected {to.state.name}",
            reason="STATE_MISMATCH",
        )
    up = rt.op.state in (S.LOADING, S.RESUMING)
    d.settle(rt, to, failures=0 if up else rt.failures)
    if ev.footprint is not None:
        model = d.models[rt.model]
        measured = ev.footprint
        old = model.spec.footprint
        if not measured.snapshot and old.snapshot:  # a load measures arenas, not snapshots
            # Weights measured larger than estimated make a larger snapshot too: the count
            # stays an upper bound of what a write may reserve.
            grown = max(0, measured.weights - old.weights)
            measured = replace(measured, snapshot=old.snapshot + grown)
        d.models[rt.model] = replace(model, spec=replace(model.spec, footprint=measured))
    if ev.snapshot_bytes is not None:
        model = d.models[rt.model]
        fp = replace(model.spec.footprint, snapshot=ev.snapshot_bytes)
        d.models[rt.model] = replace(model, spec=replace(model.spec, footprint=fp))


def on_failed(d: Draft, ev: TransitionFailed) -> None:
    """The op failed and its worker is gone: FAILED, recovered by the next request.

    A restore that failed on an unusable snapshot is not the runtime's failure: it leaves
    the snapshot behind (or keeps another one) and the next pass plans the runtime again
    from the next source, for the requests that wait for it (issue 12)."""
    rt = _current(d, ev.runtime_id, ev.seq)
    if rt is None:
        return
    why = f"{rt.state.name.lower()} failed: {ev.error.message}"
    if ev.snapshot_bytes and (ev.snapshot_left or not ev.snapshot_unusable):
        model = d.models[rt.model]
        fp = replace(model.spec.footprint, snapshot=ev.snapshot_bytes)
        d.models[rt.model] = replace(model, spec=replace(model.spec, footprint=fp))
    if ev.snapshot_unusable:
        _fail(d, rt, why, snapshot=ev.snapshot_left, counted=False)
    elif ev.snapshot_bytes:  # its snapshot was recorded before the op failed: it stays
        _fail(d, rt, why, snapshot=True)
    else:
        _fail(d, rt, why)


def on_rolled_back(d: Draft, ev: TransitionRolledBack) -> None:
    """The suspend (or either side of an exchange, run back the other way) changed nothing:
    back to where it started, with its worker. An eviction that wanted it is answered with
    the error (retrying it now would fail the same way)."""
    rt = _current(d, ev.runtime_id, ev.seq)
    if rt is None or rt.op is None:
        return
    if rt.op.state is not S.SUSPENDING and rt.op.partner is None:
        raise Internal(
            f"runtime {rt.id}: only a suspend or an exchange can be rolled back, not "
            f"{rt.op.state.name}",
            reason="BAD_ROLLBACK",
        )
    wrote = rt.op.to.snapshot and not rt.at.snapshot
    rt = d.settle(rt, rt.at, why=f"rolled back: {ev.error.message}")
    if wrote:
        rt = replace(rt, snapshot_retry_at=d.now + SNAPSHOT_RETRY_S)
        d.runtimes[rt.id] = rt
    if rt.evict is not None and not rt.evict.fallback:
        d.end_eviction(rt, ev.error)  # a drain's order stays: it falls to the next tier


def on_worker_died(d: Draft, ev: WorkerDied) -> None:
    """A worker exited on its own."""
    rt = d.runtimes.get(ev.runtime_id)
    if rt is None or rt.incarnation != ev.incarnation or not rt.state.has_worker:
        return
    _fail(d, rt, f"worker exited{': ' + ev.reason if ev.reason else ''}")


def _fail(
    d: Draft, rt: Runtime, why: str, snapshot: bool | None = None, counted: bool = True
) -> None:
    """Move `rt` to FAILED: its leases end UNAVAILABLE; after `max_load_failures` failed
    loads in a row its queue is answered UNAVAILABLE instead of retried forever.

    `snapshot` overrides whether it keeps a snapshot; an uncounted failure (an unusable
    snapshot) neither adds to the failed loads nor ends a prefetch: both try the next source.
    """
    error = Unavailable(f"runtime of {rt.model}: {why}", reason="WORKER_FAILED")
    for lease in d.leases_on(rt.id):
        d.end_lease(lease, LeaseEnd.WORKER_DIED, error)
    up = rt.op is not None and rt.op.state in (S.LOADING, S.RESUMING)
    failures = rt.failures + 1 if up and counted else rt.failures
    # A snapshot that was being written is lost with the worker; a complete one survives.
    keep = rt.at.snapshot if snapshot is None else snapshot
    rt = d.settle(rt, Residency(S.FAILED, snapshot=keep), failures=failures, why=why)
    if rt.prefetch is not None and counted:
        d.emit(Reject(rt.prefetch.request_id, error))
        rt = replace(rt, prefetch=None)
    if failures >= d.config.max_load_failures:
        d.reject_queue(
            rt.model,
            Unavailable(f"{rt.model} failed to load {failures} times: {why}", reason="LOAD_FAILED"),
        )
        rt = replace(rt, failures=0)
    d.runtimes[rt.id] = rt
