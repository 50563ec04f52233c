"""A fake daemon for policy tests: a fake clock, and a fake executor that completes (or fails)
the actions of each plan on demand. Nothing sleeps; time moves only when a test says so."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torpor.errors import TorporError, Unavailable
from torpor.scheduler.core import (
    AcquireRequested,
    Costs,
    Drop,
    Event,
    Exchange,
    Footprint,
    GpuSpec,
    Grant,
    Load,
    ModelRegistered,
    ModelSpec,
    Plan,
    PolicyConfig,
    Reject,
    Resume,
    SchedulerState,
    Suspend,
    Tick,
    TransitionCompleted,
    TransitionFailed,
    WorkerDied,
    initial_state,
    step,
)

GiB = 1024**3


@dataclass(frozen=True)
class ExchangeSide:
    """One of the two ops of an Exchange action: each side's end is reported on its own."""

    runtime_id: str
    seq: int
    action: Exchange
    outgoing: bool


Move = Load | Resume | Suspend | Drop | ExchangeSide


def exchange_sides(action: Exchange) -> tuple[ExchangeSide, ExchangeSide]:
    return (
        ExchangeSide(action.out_runtime_id, action.out_seq, action, True),
        ExchangeSide(action.in_runtime_id, action.in_seq, action, False),
    )


def footprint(weights: float, kv: float = 1, graph: float = 0.5, context: float = 0.5) -> Footprint:
    """A footprint in GiB (residue is a small fixed 64 MiB)."""
    return Footprint(
        weights=int(weights * GiB),
        kv=int(kv * GiB),
        graph_pool=int(graph * GiB),
        context=int(context * GiB),
        residue=64 * 1024**2,
    )


def world(
    gpus: tuple[float, ...] = (40,),
    host: float = 64,
    disk: float = 200,
    costs: Costs | None = None,
    **config: object,
) -> SchedulerState:
    """A state with GPUs of the given GiB, budgets in GiB, and policy overrides."""
    defaults: dict[str, object] = {"min_residency_s": 0.0}
    defaults.update(config)
    return initial_state(
        tuple(GpuSpec(i, int(g * GiB)) for i, g in enumerate(gpus)),
        host_budget=int(host * GiB),
        disk_budget=int(disk * GiB),
        costs=costs,
        config=PolicyConfig(**defaults),  # type: ignore[arg-type]
    )


@dataclass
class Harness:
    """Feeds events to `step` at a fake time and keeps what the plans asked for."""

    state: SchedulerState
    now: float = 0.0
    plans: list[Plan] = field(default_factory=list)
    moves: dict[tuple[str, int], Move] = field(default_factory=dict)
    """Transition actions started and not yet reported, by (runtime id, seq)."""
    grants: dict[str, Grant] = field(default_factory=dict)
    rejects: dict[str, TorporError] = field(default_factory=dict)
    check: Callable[[SchedulerState, Plan], None] | None = None
    """Called with the state before and the plan of every step (invariant checks)."""
    _ids: int = 0

    def send(self, event: Event, dt: float = 0.0) -> Plan:
        """Step one event, `dt` seconds after the previous one."""
        self.now += dt
        before = self.state
        self.state, plan = step(self.state, event, self.now)
        self.plans.append(plan)
        self._record(plan)
        if self.check is not None:
            self.check(before, plan)
        return plan

    def _record(self, plan: Plan) -> None:
        for action in plan.actions:
            if isinstance(action, Load | Resume | Suspend | Drop):
                self.moves[(action.runtime_id, action.seq)] = action
            elif isinstance(action, Exchange):
                for side in exchange_sides(action):
                    self.moves[(side.runtime_id, side.seq)] = side
            elif isinstance(action, Grant):
                self.grants[action.request_id] = action
            elif isinstance(action, Reject):
                self.rejects[action.request_id] = action.error

    def tick(self, dt: float) -> Plan:
        """Let `dt` seconds pass."""
        return self.send(Tick(), dt)

    def register(self, name: str, weights: float, *, snapshot: bool = False, **spec: object):
        """Register a model of `weights` GiB."""
        fp = spec.pop("fp", None) or footprint(weights)
        return self.send(ModelRegistered(ModelSpec(name, fp, **spec), snapshot))  # type: ignore[arg-type]

    def acquire(self, model: str, client: str = "c", **kw: object) -> str:
        """Send an Acquire; returns its request id."""
        self._ids += 1
        rid = f"r{self._ids}"
        self.send(AcquireRequested(rid, model, client, **kw))  # type: ignore[arg-type]
        return rid

    def _together(self, move: Move) -> list[Move]:
        """The moves whose ends are reported together: both sides of an exchange (the
        daemon reports both completed, both rolled back or both failed), else the one."""
        if not isinstance(move, ExchangeSide):
            return [move]
        return [m for m in exchange_sides(move.action) if (m.runtime_id, m.seq) in self.moves]

    def complete(self, move: Move) -> Plan:
        """Report a transition action as done."""
        plan = None
        for m in self._together(move):
            del self.moves[(m.runtime_id, m.seq)]
            plan = self.send(TransitionCompleted(m.runtime_id, m.seq))
        assert plan is not None
        return plan

    def fail(self, move: Move) -> Plan:
        """Report a transition action as failed (its worker is gone)."""
        plan = None
        for m in self._together(move):
            del self.moves[(m.runtime_id, m.seq)]
            error = Unavailable("injected failure")
            plan = self.send(TransitionFailed(m.runtime_id, m.seq, error))
        assert plan is not None
        return plan

    def kill(self, runtime_id: str) -> Plan:
        """Kill a runtime's worker."""
        rt = self.state.runtimes[runtime_id]
        return self.send(WorkerDied(runtime_id, rt.incarnation, "killed"))

    def settle(self, limit: int = 200) -> None:
        """Complete every transition, oldest first, until none is left."""
        for _ in range(limit):
            if not self.moves:
                return
            self.complete(next(iter(self.moves.values())))
        raise AssertionError(f"still moving after {limit} completions: {self.moves}")

    def rt(self, model: str):
        """The runtime of a model."""
        return self.state.runtime_of(model)

    def lease_of(self, request_id: str) -> str:
        """The lease id granted to a request."""
        return self.grants[request_id].lease_id
