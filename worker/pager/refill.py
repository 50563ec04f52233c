"""The weights' way back into a mapped arena, for `PagedRuntime.resume`: streamed from the
locked host copy (serving begins at once, see gate.py) or from the snapshot on disk; and the
small pieces a suspend or resume shares (the stopwatch of its phases, giving back torch's
cached device memory)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from torpor.store.chunks import ChunkStore
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.layout import Layout
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.gate import WeightsGate, stage_ends
from torpor.worker.pager.host import HostBuffer, HostPinner
from torpor.worker.pager.manifest import SnapshotManifest
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.pager.snapshot import MAX_CHUNK
from torpor.worker.pager.stream import StagingRing, stream_pieces

Marks = list[tuple[int, Any]]  # (bytes copied from the start, CUDA event)


def stream_in(host: HostBuffer, arena: Arena, layout: Layout, engine: Engine) -> Marks:
    """Queue the copy of the weights from the locked host copy and install the gate that
    makes each stage of the model wait for its own bytes; return at once."""
    marks = host.copy_to_streamed(arena, layout.nbytes)
    device = engine.device
    engine.model.gate = WeightsGate(
        marks,
        stage_ends(layout, engine.cfg.num_layers),
        lambda event: torch.cuda.current_stream(device).wait_event(event),
    )
    return marks


def copy_seconds(marks: Marks) -> float:
    """Wait for a streamed copy to end; its duration on the device, in seconds."""
    first, last = marks[0][1], marks[-1][1]
    last.synchronize()
    return float(first.elapsed_time(last)) / 1e3


def from_disk(
    manifest: SnapshotManifest,
    store: ChunkStore,
    region: torch.Tensor,
    options: PagerOptions,
    pinner: HostPinner | None,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Stream the snapshot's chunks into `region`, verified; the bytes moved."""
    nbytes = manifest.weight_bytes
    ring = StagingRing(options.staging_buffers, MAX_CHUNK, pinner)
    try:
        stats = stream_pieces(
            manifest.pieces,
            store,
            region,
            ring,
            threads=options.reader_threads,
            direct_io=options.direct_io,
            progress=None if progress is None else lambda d: progress(d, nbytes),
        )
    finally:
        ring.close()
    return stats.bytes


def release_cached_device_memory() -> None:
    """Give back what torch's allocator caches outside the arenas while suspended: blocks
    freed since load (warm-up, capture, eager prefill) and cuBLAS's workspaces, one per
    stream that ran a matmul (32 MiB each on Hopper; 72 MB of a suspended 70B-shaped
    runtime's residue, measured). Eager matmuls after the resume make new ones as needed.
    The captured graphs keep theirs: it was allocated during capture, in the graph pool, and
    only the graphs, replayed one at a time, use that memory."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


class Stopwatch:
    """Laps of a stopwatch, by name: where a suspend or a resume spent its time."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
