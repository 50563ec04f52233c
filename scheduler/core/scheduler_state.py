"""The scheduler's state: an immutable value that `step` turns into the next one.

Why immutable: `explain` runs the real planning code on the current state and throws the
result away; tests compare states before and after an event; the daemon can keep the
previous state for `WatchEvents` diffs. A step copies the top-level maps once into a private
`Draft` (single owner, never escapes the step) and freezes it again at the end, which costs
O(models + requests) per event: nothing next to one gRPC call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torpor.errors import InvalidArgument
from torpor.scheduler.core.accounting import Usage, exchange_share, transition_usage, usage
from torpor.scheduler.core.lifecycle import EvictMode, Residency, RuntimeState, Tier, dropped
from torpor.scheduler.core.world import (
    Costs,
    Footprint,
    GpuSpec,
    ModelSpec,
    PolicyConfig,
    RequestRate,
)


@dataclass(frozen=True, slots=True)
class Model:
    """A registered model and what the policy learned about its use."""

    spec: ModelSpec
    runtime_id: str
    rate: RequestRate = field(default_factory=RequestRate)
    last_used: float | None = None
    unregistering: bool = False
    """Unregistered while its worker was still alive: removed once the worker is dropped."""

    def keep_alive_s(self, config: PolicyConfig) -> float:
        """Its keep-alive window, the policy default filling in for 0."""
        return self.spec.keep_alive_s or config.keep_alive_s


@dataclass(frozen=True, slots=True)
class Op:
    """The one action in flight on a runtime: it moves the runtime from `at` to `to`."""

    seq: int
    """Echoed by TransitionCompleted/Failed; a mismatch is a stale report."""
    state: RuntimeState
    """LOADING, SUSPENDING or RESUMING."""
    to: Residency
    source: Tier
    """For a load or resume, the tier the bytes come from; for a suspend, the tier they go to."""
    started_at: float
    estimate_s: float
    partner: str | None = None
    """An exchange swap (docs/POLICY.md "Exchange swap"): the runtime this op trades places
    with. The pair holds `joint` together, not each its own peak."""
    joint: Usage | None = None
    """With `partner`: what the two hold together until both ops end (`exchange_joint`)."""
    outgoing: bool = False
    """With `partner`: this side leaves the GPU (the other comes in)."""


@dataclass(frozen=True, slots=True)
class EvictIntent:
    """An operator's (or a drain's) order to move a runtime down to `to_tier`."""

    request_id: str | None
    """None for the core's own orders (unregistering a model): no answer is sent."""
    to_tier: Tier
    mode: EvictMode
    deadline: float | None
    """When DRAIN gives up (DEADLINE_EXCEEDED) if leases or requests are still held."""
    fallback: bool = False
    """Go further down when `to_tier` has no room (drains), instead of RESOURCE_EXHAUSTED."""


@dataclass(frozen=True, slots=True)
class PrefetchIntent:
    """A client's request to pull a runtime up to `tier` (GPU or HOST) ahead of need."""

    request_id: str
    tier: Tier


@dataclass(frozen=True, slots=True)
class Runtime:
    """The runtime of one model (model x GPU): its residency and what is happening to it."""

    id: str
    model: str
    at: Residency
    """Its stable residency; during an op, where the op started from."""
    since: float
    """When it entered `at` (the minimum-residency age counts from here)."""
    op: Op | None = None
    incarnation: int = 0
    """Counts the workers started for it; WorkerDied names one, so a late report is stale."""
    inflight: int = 0
    """Generate calls running on it (RequestStarted - RequestFinished)."""
    failures: int = 0
    """Consecutive failed loads or resumes."""
    contended_grants: int = 0
    """Grants made while another model waited for its room (the starvation cap counts these)."""
    evict: EvictIntent | None = None
    prefetch: PrefetchIntent | None = None
    snapshot_retry_at: float = 0.0
    """No snapshot write is planned for it before this time (the last one found no room)."""

    @property
    def state(self) -> RuntimeState:
        """Its lifecycle state: the op's transitional state while one runs."""
        return self.op.state if self.op is not None else self.at.state

    @property
    def gpu(self) -> int | None:
        """The GPU its worker is bound to (or is being started on)."""
        if self.op is not None and self.op.to.gpu is not None:
            return self.op.to.gpu
        return self.at.gpu

    def target(self) -> Residency:
        """Where it will be when its op (if any) completes."""
        return self.op.to if self.op is not None else self.at


@dataclass(frozen=True, slots=True)
class Lease:
    """A client's hold on a RESIDENT runtime: while it lasts, the runtime is never a victim."""

    id: str
    request_id: str
    client: str
    model: str
    runtime_id: str
    granted_at: float
    expires_at: float
    ttl_s: float


@dataclass(frozen=True, slots=True)
class Waiter:
    """A queued Acquire."""

    request_id: str
    model: str
    client: str
    priority: int
    """The model's priority plus the request's own."""
    enqueued_at: float
    deadline: float | None
    lease_ttl_s: float
    arrived_tier: Tier
    """Where the runtime was when the request arrived (reported as `restored_from`)."""
    order: int
    """Arrival order, to break ties deterministically."""

    def rank(self) -> tuple[int, float, int]:
        """Sort key: higher priority first, then first come first served."""
        return (-self.priority, self.enqueued_at, self.order)


@dataclass(frozen=True, slots=True)
class SchedulerState:
    """Everything the policy decides from. Build the first one with `initial_state`."""

    gpus: tuple[GpuSpec, ...]
    host_budget: int
    disk_budget: int
    costs: Costs
    config: PolicyConfig
    models: Mapping[str, Model] = field(default_factory=dict)
    runtimes: Mapping[str, Runtime] = field(default_factory=dict)
    queues: Mapping[str, tuple[Waiter, ...]] = field(default_factory=dict)
    """Per model, in rank order; a model without waiters has no entry."""
    leases: Mapping[str, Lease] = field(default_factory=dict)
    draining: frozenset[int] = frozenset()
    closing: frozenset[str] = frozenset()
    """Runtimes that yield to a starving model: new Acquires for them queue (last pass)."""
    blocking: frozenset[str] = frozenset()
    """Busy runtimes that a waiting model needs room from (last pass)."""
    counter: int = 0
    """Source of op sequence numbers and lease/runtime ids."""
    now: float = float("-inf")
    """The time of the last step: time never goes backwards."""
    disk_outside: int = 0
    """Chunk-store bytes no runtime's snapshot accounts for (`DiskOutsideMeasured`): part of
    the disk ledger."""

    def gpu(self, index: int) -> GpuSpec:
        """The GPU with that index."""
        for g in self.gpus:
            if g.index == index:
                return g
        raise InvalidArgument(f"no GPU {index}; GPUs are {[g.index for g in self.gpus]}")

    def runtime_of(self, model: str) -> Runtime:
        """The runtime of a registered model."""
        return self.runtimes[self.models[model].runtime_id]

    def leases_on(self, runtime_id: str) -> int:
        """Leases held on a runtime now."""
        return sum(1 for lease in self.leases.values() if lease.runtime_id == runtime_id)

    def held(self, runtime: Runtime) -> Usage:
        """What a runtime holds now: the peak of both ends while an op runs (an exchange's
        share of what the pair holds)."""
        return held(runtime, self.runtimes, lambda m: self.models[m].spec.footprint)


def held(rt: Runtime, runtimes: Mapping[str, Runtime], fp_of: Callable[[str], Footprint]) -> Usage:
    """What `rt` holds now: its residency, or the peak of both ends while an op runs; in an
    exchange, its share of the pair's joint usage (accounting.exchange_share)."""
    fp = fp_of(rt.model)
    op = rt.op
    if op is None:
        return usage(rt.at, fp)
    if op.partner is None or op.joint is None:
        return transition_usage(rt.at, op.to, fp)
    partner = runtimes.get(op.partner)
    if partner is not None and partner.op is not None and partner.op.partner == rt.id:
        incoming = partner.op.to if op.outgoing else op.to
        in_fp = fp_of(partner.model) if op.outgoing else fp
        return exchange_share(op.joint, usage(incoming, in_fp), op.outgoing)
    # The partner's op ended (it settled, failed or was dropped): this side holds the
    # joint usage less what the partner holds now.
    now = usage(partner.at, fp_of(partner.model)) if partner is not None else Usage()
    return exchange_share(op.joint, now, outgoing=True)


def initial_state(
    gpus: tuple[GpuSpec, ...],
    *,
    host_budget: int,
    disk_budget: int,
    costs: Costs | None = None,
    config: PolicyConfig | None = None,
) -> SchedulerState:
    """An empty state: no models. Validates the GPU list and the budgets."""
    indexes = [g.index for g in gpus]
    if not gpus or len(set(indexes)) != len(indexes):
        raise InvalidArgument(f"need at least one GPU with unique indexes, got {indexes}")
    if host_budget < 0 or disk_budget < 0:
        raise InvalidArgument(
            f"budgets must be >= 0, got host={host_budget} disk={disk_budget}",
            reason="BAD_POLICY_INPUT",
        )
    return SchedulerState(
        gpus=tuple(sorted(gpus, key=lambda g: g.index)),
        host_budget=host_budget,
        disk_budget=disk_budget,
        costs=costs or Costs(),
        config=config or PolicyConfig(),
    )


def new_runtime(runtime_id: str, model: str, snapshot: bool, now: float) -> Runtime:
    """The runtime record of a newly registered model: no worker yet."""
    return Runtime(id=runtime_id, model=model, at=dropped(snapshot), since=now)
