"""Runtime lifecycle states, memory tiers, and the one transition table.

The enum values are the numbers of `torpor.v1.RuntimeState` and `torpor.v1.Tier`, so the
gRPC adapter (scheduler/convert.py) maps them by value, `RuntimeState(msg.state)` /
`common_pb2.RuntimeState.Name(state.value)`, without a lookup table, and the core never
imports protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torpor.errors import Internal


class RuntimeState(enum.IntEnum):
    """Where a runtime is in its life (docs/POLICY.md, "Runtimes, states and tiers").

    The stable states RESIDENT..COLD are ordered from most to least available; LOADING,
    SUSPENDING and RESUMING are the transitions in between; FAILED is a worker that died or a
    transition that failed (its worker is gone) and is recovered by the next request.
    """

    RESIDENT = 1
    SUSPENDED_HOST = 2
    SUSPENDED_DEEP = 3
    SUSPENDED_DISK = 4
    SNAPSHOT = 5
    COLD = 6
    LOADING = 7
    SUSPENDING = 8
    RESUMING = 9
    FAILED = 10

    @property
    def transitional(self) -> bool:
        """True for a state that a running action will leave (it holds both ends' bytes)."""
        return self in _TRANSITIONAL

    @property
    def has_worker(self) -> bool:
        """True when a worker process exists (stable states only; transitions always have one)."""
        return self in _WITH_WORKER or self.transitional

    @property
    def tier(self) -> Tier:
        """Where the weights of a runtime in this stable state are (SOURCE without a snapshot)."""
        return _TIER_OF[self]


class Tier(enum.IntEnum):
    """A memory tier, fastest first; the order is the depth an eviction goes down to.

    DROP is only an eviction target (no worker; a snapshot survives if there is one); SOURCE
    only a restore origin (nothing but the checkpoint: a cold load).
    """

    GPU = 1
    HOST = 2
    DEEP = 3
    DISK = 4
    DROP = 5
    SOURCE = 6


class EvictMode(enum.IntEnum):
    """How an operator's eviction treats in-flight work (values of `torpor.v1.EvictMode`)."""

    DRAIN = 1
    """Stop granting, wait for leases and in-flight requests to end (up to a timeout)."""
    ABORT = 2
    """Revoke leases and abort in-flight requests now."""


S = RuntimeState
_TRANSITIONAL = frozenset({S.LOADING, S.SUSPENDING, S.RESUMING})
_WITH_WORKER = frozenset({S.RESIDENT, S.SUSPENDED_HOST, S.SUSPENDED_DEEP, S.SUSPENDED_DISK})
_TIER_OF = {
    S.RESIDENT: Tier.GPU,
    S.SUSPENDED_HOST: Tier.HOST,
    S.SUSPENDED_DEEP: Tier.DEEP,
    S.SUSPENDED_DISK: Tier.DISK,
    S.SNAPSHOT: Tier.DISK,
    S.COLD: Tier.SOURCE,
    S.FAILED: Tier.SOURCE,
}

TRANSITIONS: dict[RuntimeState, frozenset[RuntimeState]] = {
    # A new worker loads from the checkpoint or a snapshot (or recovers a FAILED runtime).
    S.COLD: frozenset({S.LOADING}),
    S.SNAPSHOT: frozenset({S.LOADING, S.COLD}),  # COLD: its snapshot was deleted
    S.FAILED: frozenset({S.LOADING}),
    # A load ends on the GPU, or in host RAM for Prefetch(HOST).
    S.LOADING: frozenset({S.RESIDENT, S.SUSPENDED_HOST, S.FAILED}),
    S.RESIDENT: frozenset({S.SUSPENDING, S.FAILED}),
    S.SUSPENDED_HOST: frozenset({S.RESUMING, S.SUSPENDING, S.FAILED}),
    S.SUSPENDED_DEEP: frozenset({S.RESUMING, S.SUSPENDING, S.FAILED}),
    S.SUSPENDED_DISK: frozenset({S.RESUMING, S.SUSPENDING, S.FAILED}),
    # Down the tiers, or out of the worker altogether (a drop); or back where it started
    # when the suspend failed before changing anything (TransitionRolledBack).
    S.SUSPENDING: frozenset(
        {
            S.RESIDENT,
            S.SUSPENDED_HOST,
            S.SUSPENDED_DEEP,
            S.SUSPENDED_DISK,
            S.SNAPSHOT,
            S.COLD,
            S.FAILED,
        }
    ),
    # Up to the GPU, or from disk to host RAM for Prefetch(HOST).
    S.RESUMING: frozenset({S.RESIDENT, S.SUSPENDED_HOST, S.FAILED}),
}


def check_transition(runtime_id: str, frm: RuntimeState, to: RuntimeState) -> None:
    """Raise `Internal` unless `frm -> to` is in the table: an illegal transition is a bug."""
    if to not in TRANSITIONS[frm]:
        raise Internal(
            f"illegal transition of runtime {runtime_id}: {frm.name} -> {to.name}",
            reason="ILLEGAL_TRANSITION",
            metadata={"runtime": runtime_id, "from": frm.name, "to": to.name},
        )


@dataclass(frozen=True, slots=True)
class Residency:
    """Where a runtime's bytes are in a stable state: the unit that accounting prices.

    `host_copy` is the worker's retained pinned copy of the weights. A RESIDENT runtime may
    keep it (so a later suspend to HOST is only an unmap, never a slow pin on the eviction
    path); SUSPENDED_HOST and SUSPENDED_DEEP always have it. `snapshot` is a complete disk
    snapshot in the chunk store, which outlives the worker.
    """

    state: RuntimeState
    gpu: int | None = None
    host_copy: bool = False
    snapshot: bool = False

    def __post_init__(self) -> None:
        # Guard against impossible combinations: they would silently mis-price bytes.
        s = self.state
        bad = (
            s.transitional
            or (s.has_worker != (self.gpu is not None))
            or (s in (S.SUSPENDED_HOST, S.SUSPENDED_DEEP) and not self.host_copy)
            or (s in (S.SUSPENDED_DISK, S.SNAPSHOT) and not self.snapshot)
            or (not s.has_worker and self.host_copy)
            or (s is S.COLD and self.snapshot)
        )
        if bad:
            raise Internal(f"impossible residency {self!r}", reason="BAD_RESIDENCY")

    @property
    def tier(self) -> Tier:
        """The tier a restore starts from (DISK for a snapshot, SOURCE for a cold load)."""
        if self.state is S.FAILED and self.snapshot:
            return Tier.DISK
        return self.state.tier

    @property
    def depth(self) -> Tier:
        """How far down the tiers it is, as an eviction target compares it (DROP: no worker)."""
        return self.state.tier if self.state.has_worker else Tier.DROP


def dropped(snapshot: bool) -> Residency:
    """The residency of a runtime without a worker: SNAPSHOT when its snapshot survives."""
    return Residency(S.SNAPSHOT if snapshot else S.COLD, snapshot=snapshot)
