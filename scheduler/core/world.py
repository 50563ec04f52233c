"""The fixed facts the policy works from: GPUs, models' specs and footprints, measured costs
and the policy's knobs. All are frozen and validated on construction, with errors that print
the offending values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torpor.errors import InvalidArgument

GiB = 1024**3


def _check(ok: bool, what: str, value: object, expect: str) -> None:
    if not ok:
        raise InvalidArgument(
            f"{what} must be {expect}, got {value!r}",
            reason="BAD_POLICY_INPUT",
            metadata={"field": what, "value": value},
        )


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU as the policy sees it: what runtimes may use of it."""

    index: int
    total_bytes: int
    reserved_bytes: int = 0
    """Never given to runtimes (other processes, fragmentation)."""
    name: str = ""

    def __post_init__(self) -> None:
        _check(self.index >= 0, "gpu.index", self.index, ">= 0")
        _check(self.total_bytes > 0, "gpu.total_bytes", self.total_bytes, "> 0")
        _check(
            0 <= self.reserved_bytes < self.total_bytes,
            "gpu.reserved_bytes",
            self.reserved_bytes,
            f"in [0, total_bytes={self.total_bytes})",
        )

    @property
    def capacity(self) -> int:
        """Bytes that runtimes may hold on it."""
        return self.total_bytes - self.reserved_bytes


@dataclass(frozen=True, slots=True)
class Footprint:
    """Bytes of one runtime, by part. A worker measures them after a load; before that they
    are the estimate that admission uses."""

    weights: int
    kv: int = 0
    graph_pool: int = 0
    context: int = 0
    """CUDA context (with cuBLAS): stays on the GPU in SUSPENDED_HOST and SUSPENDED_DISK."""
    residue: int = 0
    """What else stays on the GPU in SUSPENDED_HOST (small buffers that are not in arenas)."""
    snapshot: int = 0
    """Chunk-store bytes of its snapshot: the store's count once one is recorded, an
    estimate before (weights, small files, manifest); 0: the weights stand in."""
    staging: int = 0
    """Host bytes of the worker's staging buffers (pinned on CUDA), an upper bound: the
    disk-restore ring of a load from a snapshot or a resume from disk, the buffer of a
    snapshot write, and the deep-resume stager held while SUSPENDED_DEEP. torpord sends it
    to the worker (WorkerLoadRequest.staging_bytes), which never holds more."""
    write_staging: int = 0
    """Host bytes of a snapshot write's one staging buffer, held when the weights are written
    from the device (no host copy): a chunk on CUDA; 0 on the CPU backend."""
    exchange_staging: int = 0
    """Host bytes of the staging ring one side of an exchange swap holds (pinned; CUDA: the
    stager's ring, within `staging`); 0 on the CPU backend, where nothing is locked."""

    def __post_init__(self) -> None:
        for name in (
            "weights",
            "kv",
            "graph_pool",
            "context",
            "residue",
            "snapshot",
            "staging",
            "write_staging",
            "exchange_staging",
        ):
            value = getattr(self, name)
            _check(value >= 0, f"footprint.{name}", value, ">= 0")

    @property
    def disk(self) -> int:
        """Disk bytes its snapshot counts for (`snapshot`, else the weights)."""
        return self.snapshot or self.weights

    @property
    def resident(self) -> int:
        """GPU bytes of a RESIDENT runtime: what admission must find room for."""
        return self.weights + self.kv + self.graph_pool + self.context + self.residue


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the policy needs to know of a registered model."""

    name: str
    footprint: Footprint
    priority: int = 0
    """In [-100, 100]; higher wins queues and is evicted later."""
    pinned: bool = False
    """Never a victim (it still needs room to be loaded once)."""
    keep_alive_s: float = 0.0
    """An idle runtime is not evicted within this long of its last use; 0 = the default."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", self.name, "non-empty")
        _check(-100 <= self.priority <= 100, "model.priority", self.priority, "in [-100, 100]")
        _check(self.keep_alive_s >= 0, "model.keep_alive_s", self.keep_alive_s, ">= 0")


@dataclass(frozen=True, slots=True)
class Costs:
    """Measured bandwidths (bytes/s) and fixed overheads (s) of this host's transfers.

    The daemon fills them from the catalog's measured bandwidths and sends `CostsUpdated`
    when they change; the policy never bakes in a number. Defaults are the H100 host of
    docs/BENCHMARKS.md ("Probes on an H100 host"), for tests and a first start.
    """

    host_to_gpu: float = 54.8e9
    gpu_to_host: float = 55.1e9
    disk_read: float = 1.5e9
    disk_write: float = 1.0e9
    pin: float = 1.9e9
    """Pinning new host memory: paid when a suspend to HOST has no retained copy yet."""
    cold_load: float = 1.0e9
    """Source checkpoint to GPU (read, convert, place)."""
    worker_start_s: float = 0.2
    """Process start and CUDA context creation."""
    graph_capture_s: float = 2.0
    """Re-capturing CUDA graphs in a new worker (after a snapshot or cold load)."""
    map_s: float = 0.01
    """Mapping or unmapping arenas (VMM calls)."""
    checkpoint_s: float = 0.5
    """Driver checkpoint of a worker's residual context (deep suspend)."""
    restore_context_s: float = 0.3
    """Driver restore of that context (resume from deep)."""
    deep_refill: float = 31e9
    """Host copy to GPU on a resume from deep. A deep suspend unlocks the worker's copy
    (docs/PAGER.md): with the GPU's keeper, which keeps it locked, the copy runs at DMA speed
    (torpord then sets this to host_to_gpu); without one it goes through staging buffers,
    memory-bandwidth bound: 26-33 GB/s on an H200 host (the default)."""
    unpin: float = 45e9
    """Unlocking the host copy before a deep checkpoint (22 ms per GB on an H200 host)."""

    def __post_init__(self) -> None:
        for name in (
            "host_to_gpu",
            "gpu_to_host",
            "disk_read",
            "disk_write",
            "pin",
            "cold_load",
            "deep_refill",
            "unpin",
        ):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, f"costs.{name}", value, "finite and > 0")
        for name in ("worker_start_s", "graph_capture_s", "map_s", "checkpoint_s"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"costs.{name}", value, ">= 0")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The knobs of the policy; the names match `[policy]` of the daemon's config file."""

    queue_bound: int = 64
    """Requests that may wait per model; one more is RESOURCE_EXHAUSTED."""
    keep_alive_s: float = 0.0
    """Keep-alive of models whose spec says 0."""
    min_residency_s: float = 5.0
    """A runtime resident for less than this is not a victim (anti-thrashing)."""
    starvation_cap: int = 8
    """Grants to a resident model, while a waiting model needs its room, before it yields."""
    starvation_wait_s: float = 30.0
    """A waiting model's head request that waited this long makes its blockers yield too."""
    lease_ttl_s: float = 60.0
    """Lifetime of a lease whose Acquire asks for none."""
    lease_max_ttl_s: float = 3600.0
    """Longest lease lifetime a client may ask for; longer asks are clipped."""
    rate_half_life_s: float = 300.0
    """Half-life of the decayed request rate that estimates reuse."""
    priority_weight: float = 1.0
    """Score added per unit of model priority (the reuse term is per GiB freed)."""
    max_workers: int = 16
    """Runtimes with a live worker at once (any tier)."""
    max_load_failures: int = 3
    """Consecutive failed loads of a model after which its queue gets UNAVAILABLE."""
    deep_suspend: bool = True
    """Whether SUSPENDED_DEEP may be used (`[worker] deep_suspend` of the config file)."""
    exchange_swap: bool = True
    """Whether the policy may plan exchange swaps (`[worker] exchange_swap`)."""
    exchange_slack_bytes: int = 512 * 1024**2
    """Host bytes an exchange swap turns over in beyond the larger of its two copies: one
    arena handle (`[worker] handle_size`), so that each side always gets the room the other
    gave back (docs/POLICY.md "Exchange swap")."""

    def __post_init__(self) -> None:
        _check(self.queue_bound >= 1, "policy.queue_bound", self.queue_bound, ">= 1")
        _check(self.starvation_cap >= 1, "policy.starvation_cap", self.starvation_cap, ">= 1")
        _check(self.lease_ttl_s > 0, "policy.lease_ttl_s", self.lease_ttl_s, "> 0")
        _check(
            self.lease_max_ttl_s >= self.lease_ttl_s,
            "policy.lease_max_ttl_s",
            self.lease_max_ttl_s,
            f">= policy.lease_ttl_s ({self.lease_ttl_s})",
        )
        _check(self.rate_half_life_s > 0, "policy.rate_half_life_s", self.rate_half_life_s, "> 0")
        _check(self.max_workers >= 1, "policy.max_workers", self.max_workers, ">= 1")
        failures = self.max_load_failures
        _check(failures >= 1, "policy.max_load_failures", failures, ">= 1")
        for name in ("keep_alive_s", "min_residency_s", "starvation_wait_s", "priority_weight"):
            value = getattr(self, name)
            _check(value >= 0, f"policy.{name}", value, ">= 0")


@dataclass(frozen=True, slots=True)
class RequestRate:
    """An exponentially decayed count of requests: each counts 1 and halves every half-life.

    For a steady stream of `r` requests/s the count tends to `r * half_life / ln 2`, so
    `per_second` turns it back into a rate. Only (count, time) is stored: decay is applied
    lazily when read.
    """

    count: float = 0.0
    at: float = field(default=0.0)

    def decayed(self, now: float, half_life_s: float) -> float:
        """The count as of `now`."""
        return self.count * 0.5 ** (max(0.0, now - self.at) / half_life_s)

    def bump(self, now: float, half_life_s: float) -> RequestRate:
        """The rate after one more request at `now`."""
        return RequestRate(self.decayed(now, half_life_s) + 1.0, now)

    def per_second(self, now: float, half_life_s: float) -> float:
        """Requests per second, as the decayed count estimates it."""
        return self.decayed(now, half_life_s) * math.log(2) / half_life_s
