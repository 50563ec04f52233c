"""`Draft`: the one mutable copy of the state inside a step.

A step copies the state's maps into a Draft, handlers and the scheduling pass change it and
append actions, and `freeze` turns it into the next immutable state plus the plan. The Draft
never escapes the step, so nothing else can observe it half-changed.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from torpor.errors import TorporError
from torpor.scheduler.core.accounting import Usage
from torpor.scheduler.core.actions import (
    Action,
    Decision,
    EndLease,
    EvictFinished,
    LeaseEnd,
    Plan,
    Reject,
    Transition,
)
from torpor.scheduler.core.lifecycle import Residency, RuntimeState, Tier, check_transition
from torpor.scheduler.core.scheduler_state import (
    Lease,
    Model,
    Op,
    Runtime,
    SchedulerState,
    Waiter,
    held,
)
from torpor.scheduler.core.world import Footprint


class Draft:
    """The state being built by one step, plus what the step emits."""

    def __init__(self, state: SchedulerState, now: float) -> None:
        self.now = now
        self.gpus = state.gpus
        self.host_budget = state.host_budget
        self.disk_budget = state.disk_budget
        self.disk_outside = state.disk_outside
        self.costs = state.costs
        self.config = state.config
        self.models: dict[str, Model] = dict(state.models)
        self.runtimes: dict[str, Runtime] = dict(state.runtimes)
        self.queues: dict[str, list[Waiter]] = {m: list(q) for m, q in state.queues.items()}
        self.leases: dict[str, Lease] = dict(state.leases)
        self.draining: set[int] = set(state.draining)
        self.closing: frozenset[str] = state.closing
        self.blocking: frozenset[str] = state.blocking
        self.counter = state.counter
        self.actions: list[Action] = []
        self.transitions: list[Transition] = []
        self.decisions: dict[str, Decision] = {}
        self.wake_at: float | None = None

    # Reading ---------------------------------------------------------------------------

    def fp(self, model: str) -> Footprint:
        """The footprint of a model."""
        return self.models[model].spec.footprint

    def runtime_of(self, model: str) -> Runtime:
        """The runtime of a registered model."""
        return self.runtimes[self.models[model].runtime_id]

    def leases_on(self, runtime_id: str) -> list[Lease]:
        """Leases held on a runtime, oldest first."""
        return [lease for lease in self.leases.values() if lease.runtime_id == runtime_id]

    def held(self, rt: Runtime) -> Usage:
        """What a runtime holds now (the peak of both ends while an op runs; an exchange's
        share of the pair)."""
        return held(rt, self.runtimes, self.fp)

    # Changing --------------------------------------------------------------------------

    def number(self) -> int:
        """A fresh number for an op sequence or an id."""
        self.counter += 1
        return self.counter

    def emit(self, action: Action) -> None:
        """Append an action to the plan."""
        self.actions.append(action)

    def decide(self, decision: Decision) -> None:
        """Record the decision for a model (a later one in the same step replaces it)."""
        self.decisions[decision.model] = decision

    def start_op(
        self,
        rt: Runtime,
        state: RuntimeState,
        to: Residency,
        source: Tier,
        estimate_s: float,
        pair: tuple[str, Usage, bool] | None = None,
    ) -> Op:
        """Put `rt` into the transitional `state` towards `to`; checks the table. `pair`:
        (partner, joint usage, outgoing) of an exchange swap."""
        check_transition(rt.id, rt.at.state, state)
        partner, joint, outgoing = pair if pair is not None else (None, None, False)
        op = Op(self.number(), state, to, source, self.now, estimate_s, partner, joint, outgoing)
        self.runtimes[rt.id] = replace(rt, op=op)
        self.transitions.append(Transition(rt.id, rt.model, rt.at.state, state))
        return op

    def settle(
        self, rt: Runtime, at: Residency, failures: int | None = None, why: str = ""
    ) -> Runtime:
        """End `rt`'s op (if any) in the stable residency `at` (`why`: the reason of a
        failure or a rollback, for the event log); checks the table."""
        check_transition(rt.id, rt.state, at.state)
        self.transitions.append(Transition(rt.id, rt.model, rt.state, at.state, why))
        failures = rt.failures if failures is None else failures
        new = replace(rt, at=at, op=None, since=self.now, failures=failures)
        self.runtimes[rt.id] = new
        return new

    def end_lease(self, lease: Lease, why: LeaseEnd, error: TorporError | None = None) -> None:
        """Remove a lease and tell its holder."""
        del self.leases[lease.id]
        self.emit(EndLease(lease.id, lease.request_id, why, error))

    def end_eviction(self, rt: Runtime, error: TorporError | None = None) -> Runtime:
        """Answer and clear `rt`'s eviction order (EvictFinished, with `error` if it failed)."""
        intent = rt.evict
        if intent is not None and intent.request_id is not None:
            self.emit(EvictFinished(intent.request_id, rt.id, rt.model, rt.state, error))
        new = replace(rt, evict=None)
        self.runtimes[rt.id] = new
        return new

    def reject_queue(self, model: str, error: TorporError) -> None:
        """Answer every queued request of a model with `error`."""
        for waiter in self.queues.pop(model, []):
            self.emit(Reject(waiter.request_id, error))

    def touch(self, model: str) -> None:
        """Record a use of the model now (keep-alive counts from its last use)."""
        self.models[model] = replace(self.models[model], last_used=self.now)

    # Freezing --------------------------------------------------------------------------

    def freeze(self) -> tuple[SchedulerState, Plan]:
        """The next state and the plan of this step."""
        state = SchedulerState(
            gpus=self.gpus,
            host_budget=self.host_budget,
            disk_budget=self.disk_budget,
            disk_outside=self.disk_outside,
            costs=self.costs,
            config=self.config,
            models=MappingProxyType(self.models),
            runtimes=MappingProxyType(self.runtimes),
            queues=MappingProxyType({m: tuple(q) for m, q in self.queues.items() if q}),
            leases=MappingProxyType(self.leases),
            draining=frozenset(self.draining),
            closing=self.closing,
            blocking=self.blocking,
            counter=self.counter,
            now=self.now,
        )
        plan = Plan(
            actions=tuple(self.actions),
            transitions=tuple(self.transitions),
            decisions=tuple(self.decisions.values()),
            wake_at=self.wake_at,
        )
        return state, plan
