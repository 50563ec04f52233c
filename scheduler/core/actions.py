"""What the core tells the daemon: actions to execute, and why (a `Plan`).

Every action of a plan may be started at once and run concurrently: the core only emits a
transition when the bytes it needs are free *now*, counting every running transition at the
larger of its two ends. Actions that must wait for others (a load after its victims' suspends)
appear in a later plan, after the TransitionCompleted that frees their room.

An action that moves a runtime (Load, Resume, Suspend, Drop) carries `seq`; the daemon
reports its end with TransitionCompleted(runtime_id, seq) or TransitionFailed(runtime_id,
seq, error). The others are replies and notices and complete nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torpor.errors import TorporError
from torpor.scheduler.core.lifecycle import RuntimeState, Tier


@dataclass(frozen=True, slots=True)
class Load:
    """Start a new worker on `gpu` and load the model from `source` (DISK: its snapshot;
    SOURCE: the checkpoint). It ends RESIDENT, or SUSPENDED_HOST for Prefetch(HOST): the
    worker builds on the GPU and suspends to host within the one call, holding the full
    footprint there until it ends (accounting.transition_usage)."""

    runtime_id: str
    model: str
    seq: int
    gpu: int
    source: Tier
    target: RuntimeState
    incarnation: int
    keep_host_copy: bool
    """Retain a pinned host copy of the weights (budgeted), so a later suspend is an unmap."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Bring a suspended worker's weights back up from `source` (HOST, DEEP or DISK). A
    resume from DISK to SUSPENDED_HOST maps nothing on the GPU: the worker reads the snapshot
    into its host copy."""

    runtime_id: str
    model: str
    seq: int
    source: Tier
    target: RuntimeState
    """RESIDENT, or SUSPENDED_HOST for a Prefetch(HOST) of a SUSPENDED_DISK runtime."""
    keep_host_copy: bool


@dataclass(frozen=True, slots=True)
class Suspend:
    """Move a live worker down to `level` (HOST, DEEP or DISK); the worker stays."""

    runtime_id: str
    model: str
    seq: int
    level: Tier
    write_snapshot: bool
    """DISK without a snapshot: write one (its bytes were budgeted) before unmapping."""
    snapshot_bytes: int = 0
    """With `write_snapshot`: the disk bytes the core counts for it. torpord reserves them in
    the chunk store before the worker writes, and the worker writes no more new bytes."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """Trade places on `gpu` (docs/POLICY.md "Exchange swap"): the outgoing runtime (RESIDENT,
    no host copy) goes to SUSPENDED_HOST while the incoming one (SUSPENDED_HOST) comes back
    RESIDENT without keeping its copy, both at once, each taking only what the other gives
    back: host RAM holds one copy of the two, not two. Two ops: the daemon reports each
    seq's end. If a side fails, the daemon runs the exchange the other way and reports both
    TransitionRolledBack; if that fails too, both TransitionFailed."""

    out_runtime_id: str
    out_model: str
    out_seq: int
    in_runtime_id: str
    in_model: str
    in_seq: int
    gpu: int
    host_slack: int
    """Host bytes the pair may hold beyond what it holds at the start (the board's)."""
    gpu_slack: int
    """GPU bytes the pair may hold beyond what it holds at the start."""


@dataclass(frozen=True, slots=True)
class Drop:
    """Stop the worker. Its snapshot, if any, survives (the runtime becomes SNAPSHOT)."""

    runtime_id: str
    model: str
    seq: int


@dataclass(frozen=True, slots=True)
class AbortRequests:
    """End the runtime's in-flight Generate calls with ABORTED (an ABORT eviction)."""

    runtime_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Grant:
    """Answer an Acquire: READY with a lease."""

    request_id: str
    model: str
    runtime_id: str
    gpu: int
    lease_id: str
    expires_at: float
    restored_from: Tier
    """Where the runtime was when the request arrived (GPU: a hit)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer a request (Acquire, Prefetch, Evict, Drain) with an error."""

    request_id: str
    error: TorporError


class LeaseEnd(enum.Enum):
    """Why a lease ended."""

    RELEASED = "released"
    EXPIRED = "expired"
    CLIENT_GONE = "client_gone"
    REVOKED = "revoked"
    """An ABORT eviction took the runtime away (the Acquire stream ends ABORTED)."""
    WORKER_DIED = "worker_died"
    """The runtime's worker died (UNAVAILABLE)."""


@dataclass(frozen=True, slots=True)
class EndLease:
    """A lease ended: close its Acquire stream (OK when `error` is None)."""

    lease_id: str
    request_id: str
    why: LeaseEnd
    error: TorporError | None = None


@dataclass(frozen=True, slots=True)
class Renewed:
    """Answer a Renew: the lease's new expiry."""

    lease_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class EvictFinished:
    """The end of one runtime's part of an Evict or Drain request: it reached the target
    tier (or fell below it), or, with `error`, the order was given up (DRAIN timed out, the
    tier had no room, the model was pinned or unregistered, a newer order replaced it)."""

    request_id: str
    runtime_id: str
    model: str
    state: RuntimeState
    error: TorporError | None = None


@dataclass(frozen=True, slots=True)
class DrainStarted:
    """Answer a Drain: these runtimes will each get an EvictFinished (or a Reject)."""

    request_id: str
    gpu: int
    runtime_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PrefetchDone:
    """A prefetch reached its tier (or the runtime was already there)."""

    request_id: str
    model: str
    state: RuntimeState


Action = (
    Load
    | Exchange
    | Resume
    | Suspend
    | Drop
    | AbortRequests
    | Grant
    | Reject
    | EndLease
    | Renewed
    | EvictFinished
    | DrainStarted
    | PrefetchDone
)


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change a step made (for the event log and metrics)."""

    runtime_id: str
    model: str
    frm: RuntimeState
    to: RuntimeState
    why: str = ""
    """Why, when it is not the planned outcome: a failure, or a rolled-back suspend."""


@dataclass(frozen=True, slots=True)
class VictimChoice:
    """A runtime a plan moves down to make room, and why it was chosen."""

    runtime_id: str
    model: str
    gpu: int | None
    frm: RuntimeState
    to_tier: Tier
    """HOST, DEEP, DISK or DROP."""
    to: RuntimeState
    gpu_bytes_freed: int
    host_bytes_freed: int
    score: float
    """Lower goes first: reuse/s x restore seconds from `to_tier` / GiB freed + priority."""
    seconds: float
    """Estimated time of the move itself."""
    exchange: bool = False
    """It trades places with the runtime being placed (an exchange swap): its host copy is
    made in the pages that runtime's copy gives back, at the same time."""


class Reason(enum.Enum):
    """Why a model is or is not admitted now (ExplainResponse.reason_code)."""

    RESIDENT = "RESIDENT"
    FITS = "FITS"
    EVICT = "EVICT"
    IN_PROGRESS = "IN_PROGRESS"
    MOVING = "MOVING"
    """Its runtime is in another transition (being suspended): wait for it."""
    QUEUE_BUSY = "QUEUE_BUSY"
    """Victims would be needed but the candidates are leased, serving, or protected."""
    QUEUE_YIELDING = "QUEUE_YIELDING"
    """Resident, but yielding its GPU to a starving model (or being evicted by an operator)."""
    NEVER_FITS = "NEVER_FITS"
    BLOCKED_BY_PINNED = "BLOCKED_BY_PINNED"
    NO_GPU = "NO_GPU"
    """Every GPU that could hold it is draining."""
    QUEUE_FULL = "QUEUE_FULL"
    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE = "DEADLINE"


ADMITTED = frozenset({Reason.RESIDENT, Reason.FITS, Reason.EVICT, Reason.IN_PROGRESS})


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one model in one step: the body of Explain."""

    model: str
    reason: Reason
    detail: str
    gpu: int | None = None
    victims: tuple[VictimChoice, ...] = ()
    """In the order they go (host-RAM victims before the GPU victims they make room for)."""
    estimate_s: float = 0.0
    """Evictions plus the restore or load; waiting for busy runtimes is not included."""
    source_tier: Tier = Tier.GPU
    required_bytes: int = 0
    blockers: tuple[str, ...] = ()
    """Busy runtimes it waits for (QUEUE_BUSY)."""

    @property
    def admit(self) -> bool:
        """True when the model can be made ready now (possibly after evictions)."""
        return self.reason in ADMITTED


@dataclass(frozen=True, slots=True)
class Plan:
    """The result of one step: actions to execute now, and the reasons."""

    actions: tuple[Action, ...] = ()
    transitions: tuple[Transition, ...] = ()
    decisions: tuple[Decision, ...] = ()
    """One per model that had waiters (or a prefetch) in this step."""
    wake_at: float | None = None
    """Send a Tick at this time unless another event comes first (None: nothing is due)."""
