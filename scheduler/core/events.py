"""What the daemon tells the core: requests from clients and operators, and results of actions.

Two kinds, answered differently:
- *requests* carry a `request_id` (AcquireRequested, PrefetchRequested, EvictRequested,
  DrainRequested). Their answer is an action in this or a later plan (Grant / Reject /
  PrefetchDone / EvictFinished), never an exception, because it may come much later;
- *commands* (everything else) take effect at once. An invalid one (unknown model or lease,
  a pinned model's eviction, ...) makes `step` raise its `TorporError` and the state is
  unchanged, so the daemon answers the RPC with that error.

Time is not in the events: `step(state, event, now)` takes it, so `Tick` has no fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from torpor.errors import TorporError
from torpor.scheduler.core.lifecycle import EvictMode, RuntimeState, Tier
from torpor.scheduler.core.world import Costs, Footprint, ModelSpec


@dataclass(frozen=True, slots=True)
class ModelRegistered:
    """A model was registered (or known again after a daemon restart)."""

    spec: ModelSpec
    has_snapshot: bool = False
    """A complete snapshot of it is in the chunk store (its bytes count against disk)."""


@dataclass(frozen=True, slots=True)
class ModelUnregistered:
    """Unregister: FAILED_PRECONDITION while leased; queued requests get NOT_FOUND."""

    model: str


@dataclass(frozen=True, slots=True)
class AcquireRequested:
    """A client wants a lease on a RESIDENT runtime of `model`."""

    request_id: str
    model: str
    client: str
    """The connection or stream it came on; ClientGone(client) cancels it."""
    priority: int = 0
    """Added to the model's priority."""
    deadline: float | None = None
    """Absolute time (the clock of `now`); DEADLINE_EXCEEDED if still queued then."""
    lease_ttl_s: float | None = None
    """Requested lifetime; None is the policy's lease_ttl_s; clipped to lease_max_ttl_s."""


@dataclass(frozen=True, slots=True)
class RenewRequested:
    """Extend a lease by `ttl_s` from now (None: its original lifetime). NOT_FOUND if gone."""

    lease_id: str
    ttl_s: float | None = None


@dataclass(frozen=True, slots=True)
class LeaseReleased:
    """The holder gave a lease back. NOT_FOUND if it expired or was released already."""

    lease_id: str


@dataclass(frozen=True, slots=True)
class ClientGone:
    """A client's stream or connection closed: its leases end and its queued requests go."""

    client: str


@dataclass(frozen=True, slots=True)
class RequestStarted:
    """A Generate call started on the model's runtime (it is busy until RequestFinished)."""

    model: str


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """A Generate call ended, however it ended (sent once for every RequestStarted)."""

    model: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: expire deadlines and leases, re-check time-bound protections.

    Send one at `Plan.wake_at` (nothing time-bound changes before it) or periodically."""


@dataclass(frozen=True, slots=True)
class TransitionCompleted:
    """The action with sequence number `seq` on `runtime_id` finished successfully."""

    runtime_id: str
    seq: int
    state: RuntimeState | None = None
    """The state the worker reports; checked against the plan's target when given."""
    footprint: Footprint | None = None
    """Bytes the worker measured after a load; replaces the model's estimate."""
    snapshot_bytes: int | None = None
    """A suspend that wrote a snapshot: the bytes the chunk store holds for it (the model's
    `Footprint.snapshot` from now on)."""


@dataclass(frozen=True, slots=True)
class TransitionFailed:
    """The action `seq` on `runtime_id` failed. Send it once the worker has exited (kill it
    first if needed): the runtime becomes FAILED and holds nothing but its snapshot."""

    runtime_id: str
    seq: int
    error: TorporError
    snapshot_unusable: bool = False
    """A restore from the snapshot failed because the snapshot itself is unusable (a chunk
    corrupt or missing, or it does not fit this runtime). The runtime is planned again from
    the next source, and the failure does not count towards `max_load_failures`: the
    waiting requests are served from there, not answered with an error."""
    snapshot_left: bool = False
    """With `snapshot_unusable`: another complete snapshot of the model is left (the next
    restore reads it). Otherwise the runtime keeps none and the next load is cold."""
    snapshot_bytes: int | None = None
    """With `snapshot_left`: the bytes the store holds for that other snapshot. Without
    `snapshot_unusable`: a snapshot the failed op recorded before it failed (a DISK suspend
    whose write committed); the runtime keeps it. Either way the model's `Footprint.snapshot`
    from now on."""


@dataclass(frozen=True, slots=True)
class TransitionRolledBack:
    """The suspend `seq` on `runtime_id` failed before it changed anything: its worker lives
    and its runtime is where the op started (a snapshot the store or its disk had no room
    for, issue 12). The runtime goes back to its previous state; an eviction that wanted the
    move is answered with `error` (a drain falls to the next tier instead), and the policy
    picks no snapshot write for it for a while (an operator's eviction still may)."""

    runtime_id: str
    seq: int
    error: TorporError


@dataclass(frozen=True, slots=True)
class WorkerDied:
    """A worker exited on its own (crash, OOM kill). `incarnation` is the Load's."""

    runtime_id: str
    incarnation: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PrefetchRequested:
    """Pull `model` up to `tier` (GPU or HOST) if there is free room or lower-value room."""

    request_id: str
    model: str
    tier: Tier


@dataclass(frozen=True, slots=True)
class EvictRequested:
    """Operator: move the model's runtime down to `to_tier` (HOST, DEEP, DISK or DROP)."""

    request_id: str
    model: str
    to_tier: Tier
    mode: EvictMode = EvictMode.DRAIN
    drain_timeout_s: float | None = None
    """How long DRAIN waits for leases and requests to end; None waits forever."""


@dataclass(frozen=True, slots=True)
class PinChanged:
    """Operator: pin or unpin a model."""

    model: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """Operator: stop placing runtimes on `gpu` and move its unpinned resident runtimes down
    to `to_tier`; with `undrain`, place runtimes there again (nothing is moved)."""

    request_id: str
    gpu: int
    to_tier: Tier = Tier.HOST
    mode: EvictMode = EvictMode.DRAIN
    drain_timeout_s: float | None = None
    undrain: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotDeleted:
    """The store deleted the model's snapshot. Ask `snapshot_in_use` first: deleting one a
    runtime depends on raises FAILED_PRECONDITION."""

    model: str


@dataclass(frozen=True, slots=True)
class DiskOutsideMeasured:
    """The chunk store holds `nbytes` that no runtime's snapshot accounts for (snapshots the
    core does not track, leftovers of failed writes): they count in the disk ledger."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class CostsUpdated:
    """New measured bandwidths and overheads (from the catalog)."""

    costs: Costs


Event = (
    ModelRegistered
    | ModelUnregistered
    | AcquireRequested
    | RenewRequested
    | LeaseReleased
    | ClientGone
    | RequestStarted
    | RequestFinished
    | Tick
    | TransitionCompleted
    | TransitionFailed
    | TransitionRolledBack
    | WorkerDied
    | PrefetchRequested
    | EvictRequested
    | PinChanged
    | DrainRequested
    | SnapshotDeleted
    | DiskOutsideMeasured
    | CostsUpdated
)
