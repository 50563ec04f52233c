"""What each plan changed, as audit events and metrics."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from torpor.scheduler.core import EndLease, Grant, Plan, SchedulerState, Suspend
from torpor.scheduler.labels import HIT_LABELS, LEASE_END_EVENTS, STATE_LABELS, TIER_LABELS
from torpor.scheduler.residency import accounted_gpu_bytes

if TYPE_CHECKING:
    from torpor.scheduler.event_log import EventLog
    from torpor.scheduler.metrics import Metrics


def record_plan(
    events: EventLog, metrics: Metrics, before: SchedulerState, state: SchedulerState, plan: Plan
) -> None:
    """Audit events and metrics for one step (`before` knows the leases that just ended)."""
    for t in plan.transitions:
        runtime = state.runtimes.get(t.runtime_id)
        events.append(
            "state_changed",
            model=t.model,
            runtime=t.runtime_id,
            gpu=runtime.gpu if runtime else None,
            frm=STATE_LABELS[t.frm],
            to=STATE_LABELS[t.to],
            why=t.why or None,
        )
    for action in plan.actions:
        if isinstance(action, Grant):
            events.append(
                "lease_granted",
                model=action.model,
                runtime=action.runtime_id,
                gpu=action.gpu,
                lease=action.lease_id,
                restored_from=TIER_LABELS[action.restored_from],
            )
            metrics.hit(HIT_LABELS[action.restored_from])
        elif isinstance(action, EndLease):
            lease = before.leases.get(action.lease_id)
            runtime = before.runtimes.get(lease.runtime_id) if lease is not None else None
            events.append(
                LEASE_END_EVENTS[action.why],
                model=lease.model if lease else None,
                runtime=lease.runtime_id if lease else None,
                gpu=runtime.gpu if runtime else None,
                lease=action.lease_id,
                why=action.why.value,
            )
        elif isinstance(action, Suspend):
            events.append(
                "eviction",
                model=action.model,
                runtime=action.runtime_id,
                to=TIER_LABELS[action.level],
                snapshot=action.write_snapshot,
            )
            metrics.eviction("pressure", TIER_LABELS[action.level])
    _metrics(metrics, state)


def _metrics(m: Metrics, state: SchedulerState) -> None:
    m.set_runtime_states(Counter(STATE_LABELS[r.state] for r in state.runtimes.values()))
    for gpu, used in accounted_gpu_bytes(state).items():
        m.set_tier_bytes(gpu, "gpu", used)
    m.set_leases(len(state.leases))
    for model, waiters in state.queues.items():
        m.set_queue_depth(model, len(waiters))
