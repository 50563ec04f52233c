"""Time estimates from measured costs, and the victim score.

The score is GreedyDual-Size-Frequency-like (Cherkasova, "Improving WWW proxies performance
with Greedy-Dual-Size-Frequency caching policy", HP Labs 1998): the value of keeping an object
is its expected reuse times the cost of fetching it again, per byte it occupies. Here:

    score = rate (requests/s, decayed) x restore seconds from the tier it would drop to
            / GiB freed  +  priority_weight x model priority

The lowest score is evicted first. GDSF's inflation clock is not needed: the decayed rate
already ages a model that is no longer used.
"""

from __future__ import annotations

from torpor.scheduler.core.lifecycle import Residency, RuntimeState
from torpor.scheduler.core.world import Costs, Footprint, GiB, PolicyConfig

S = RuntimeState


def restore_seconds(res: Residency, fp: Footprint, costs: Costs) -> float:
    """Estimated time to get a runtime from `res` to RESIDENT."""
    w = fp.weights
    match res.state:
        case S.RESIDENT:
            return 0.0
        case S.SUSPENDED_HOST:
            return costs.map_s + w / costs.host_to_gpu
        case S.SUSPENDED_DEEP:  # by the keeper at DMA speed, or staged without one
            return costs.restore_context_s + costs.map_s + w / costs.deep_refill
        case S.SUSPENDED_DISK:
            return costs.map_s + w / costs.disk_read
    # No worker: start one, stream the weights, capture graphs again.
    read = w / costs.disk_read if res.snapshot else w / costs.cold_load
    return costs.worker_start_s + read + costs.graph_capture_s


def prefetch_host_seconds(res: Residency, fp: Footprint, costs: Costs) -> float:
    """Estimated time to get a runtime from `res` to SUSPENDED_HOST (Prefetch(HOST)): from
    SUSPENDED_DISK the snapshot is read into a freshly pinned host copy; from no worker the
    engine is built on the GPU (graphs captured), then its weights are copied out to a pinned
    host copy and the arenas unmapped."""
    w = fp.weights
    pin = w / costs.pin
    if res.state is S.SUSPENDED_DISK:
        return pin + w / costs.disk_read
    read = w / costs.disk_read if res.snapshot else w / costs.cold_load
    copy_out = pin + w / costs.gpu_to_host + costs.map_s
    return costs.worker_start_s + read + costs.graph_capture_s + copy_out


def demote_seconds(frm: Residency, to: Residency, fp: Footprint, costs: Costs) -> float:
    """Estimated time of moving a runtime down from `frm` to `to`."""
    w = fp.weights
    if not to.state.has_worker:
        return 0.0
    seconds = costs.map_s
    if to.host_copy and not frm.host_copy:
        # Pinning is slow (1.9 GB/s, docs/BENCHMARKS.md#probes-on-an-h100-host); this is why
        # loads keep a copy when they can.
        seconds += w / costs.pin + w / costs.gpu_to_host
    if to.state is S.SUSPENDED_DEEP and frm.state is not S.SUSPENDED_DEEP:
        seconds += costs.checkpoint_s + w / costs.unpin
    if to.snapshot and not frm.snapshot:
        seconds += w / costs.disk_write
    return seconds


def reuse_rate(rate_per_s: float) -> float:
    """Expected requests per second; a floor keeps never-used models comparable by cost."""
    return max(rate_per_s, 1e-6)


def score(
    rate_per_s: float, restore_s: float, bytes_freed: int, priority: int, config: PolicyConfig
) -> float:
    """The victim score (see the module docstring); lower is evicted first."""
    gib = max(bytes_freed / GiB, 1e-9)
    return reuse_rate(rate_per_s) * restore_s / gib + config.priority_weight * priority
