"""The states and reports of a paged runtime (`runtime.py`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torpor.errors import FailedPrecondition, InvalidArgument


class SuspendLevel(enum.Enum):
    """How far a suspend goes; later members free more and restore slower."""

    HOST = "host"
    DEEP = "deep"
    DISK = "disk"


class PagedState(enum.Enum):
    """Where the runtime's weights are."""

    RESIDENT = "resident"
    SUSPENDED_HOST = "suspended_host"
    SUSPENDED_DEEP = "suspended_deep"
    SUSPENDED_DISK = "suspended_disk"
    # In an exchange swap, or stopped half way through one: some weight handles on the
    # device, the rest in the host copy; only another exchange (or close) moves it on.
    EXCHANGING = "exchanging"
    CLOSED = "closed"


SUSPENDED = {
    SuspendLevel.HOST: PagedState.SUSPENDED_HOST,
    SuspendLevel.DEEP: PagedState.SUSPENDED_DEEP,
    SuspendLevel.DISK: PagedState.SUSPENDED_DISK,
}


LEVEL_OF = {residency: level for level, residency in SUSPENDED.items()}
"""The level a suspended runtime is at (the tier a resume starts from)."""

# Suspended states and the levels a runtime in them may still move down to.
DEEPER = {
    PagedState.SUSPENDED_HOST: (SuspendLevel.DEEP, SuspendLevel.DISK),
    PagedState.SUSPENDED_DEEP: (SuspendLevel.DISK,),
}


@dataclass(frozen=True)
class SuspendReport:
    level: SuspendLevel
    seconds: float
    gpu_bytes_released: int
    requests_aborted: int
    # Where the time went: "park" (the engine loop stopped between steps), "unmap" (the
    # arenas' memory released), "cache" (torch's cached blocks and cuBLAS's workspaces given
    # back), "checkpoint" (deep: the host copy unlocked and the driver's checkpoint).
    phases: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumeReport:
    tier: str  # host | deep | disk
    seconds: float
    bytes: int
    # Where the time went, in order: "restore" (deep: the driver's), "map" (the weights
    # arena), "refill" (the weights' bytes; "refill_enqueued" when streamed), "finish" (KV
    # zeroed, graph pool mapped).
    phases: dict[str, float] = field(default_factory=dict)
    # Serving began while the weights were still being copied (each layer waits for its
    # own bytes); `seconds` is then the time until serving, not until the last byte.
    streamed: bool = False
    # How the weights came back: "stream" (see `streamed`), "copy" (from the copy locked in
    # this process), "keeper" (copied by the keeper, which keeps it locked), "staging" (an
    # unlocked copy, through staging buffers) or "disk".
    via: str = "copy"

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class MemoryUsage:
    gpu_bytes: int  # mapped arena bytes on the device (0 on the CPU backend)
    arena_bytes: int  # mapped arena bytes, whatever the backend
    host_bytes: int  # retained host copy of the weights
    disk_bytes: int  # the weights' snapshot on disk


def check_resume(
    residency: PagedState, source: PagedState | None, target: PagedState, keep_host_copy: bool
) -> None:
    """Refuse a resume the runtime at `residency` cannot do: FailedPrecondition for a
    `source` that is not where it is (the caller's view is stale), InvalidArgument for a
    `target` other than RESIDENT, or SUSPENDED_HOST from disk with its host copy kept."""
    if source is not None and source is not residency:
        raise FailedPrecondition(
            f"cannot resume from {source.value}: the runtime is {residency.value}",
            reason="WRONG_RESUME_SOURCE",
            metadata={"state": residency.value, "source": source.value},
        )
    if target is PagedState.RESIDENT:
        return
    if target is not PagedState.SUSPENDED_HOST or residency is not PagedState.SUSPENDED_DISK:
        raise InvalidArgument(
            f"a resume from {residency.value} ends resident, not {target.value} "
            "(only a disk resume may stop at host)",
            reason="BAD_TARGET",
            metadata={"state": residency.value, "target": target.value},
        )
    if not keep_host_copy:
        raise InvalidArgument(
            "a resume to host keeps its host copy: that is where the weights go",
            reason="BAD_TARGET",
            metadata={"target": target.value},
        )
