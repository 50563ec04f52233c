"""The weights' way back into a mapped arena, for `PagedRuntime.resume` (`Refill`): streamed
from the locked host copy (serving begins at once, see gate.py), copied from it (locked here,
by the keeper, or through staging buffers), or from the snapshot on disk; the snapshot's way
into a new host copy without touching the device (`snapshot_to_host`, a prefetch to host);
and the small pieces a suspend or resume shares (the stopwatch of its phases, giving back
torch's cached device memory)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torpor.errors import FailedPrecondition, TorporError
from torpor.log import get_logger
from torpor.store.chunks import ChunkStore
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.layout import Layout
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.gate import WeightsGate, stage_ends
from torpor.worker.pager.host import HostBuffer, HostPinner
from torpor.worker.pager.host_copy import HostCopy
from torpor.worker.pager.manifest import SnapshotManifest
from torpor.worker.pager.placement import ArenaPlacement, PagerOptions
from torpor.worker.pager.stream import (
    HostStager,
    StagingRing,
    read_pieces_to_host,
    stream_pieces,
)
from torpor.worker.progress import ByteProgress

log = get_logger("pager.runtime")

Marks = list[tuple[int, Any]]  # (bytes copied from the start, CUDA event)

STAGE_BYTES = 16 << 20
"""Bytes per staging buffer for bringing back an unlocked host copy (deep resume)."""


class Refill:
    """How a resume brings the weights back into the mapped weights arena, and what the last
    one did: `via` ("stream", "copy", "keeper", "staging" or "disk", as ResumeReport.via)
    and, for a streamed one, the marks of its copy until `wait` or `forget`."""

    def __init__(
        self,
        engine: Engine,
        placement: ArenaPlacement,
        options: PagerOptions,
        host_copy: HostCopy,
    ) -> None:
        self.engine = engine
        self.placement = placement
        self.options = options
        self.host_copy = host_copy
        self.via = "copy"
        self.stager: HostStager | None = None  # made at the first deep suspend (CUDA)
        self._streamed: Marks | None = None

    @property
    def _weights(self) -> Arena:
        return self.placement.arenas["weights"]

    @property
    def _nbytes(self) -> int:
        return self.engine.memory.weights.nbytes

    def prepare_deep(self, pinner: HostPinner | None) -> None:
        """Before a deep suspend unlocks the host copy: the staging buffers that bring it
        back when the keeper cannot (made once, and kept)."""
        if pinner is not None and self.stager is None:
            threads = self.options.stage_threads
            piece = min(STAGE_BYTES, self._nbytes)
            ring = StagingRing.within(self.options.staging_limit, threads + 2, piece, pinner)
            self.stager = HostStager(threads, ring)

    def can_stream(self, from_disk: bool) -> bool:
        """Whether this resume can serve while the weights are still being copied: from a
        whole page-locked host copy, on CUDA (a disk resume verifies every chunk first, and an
        unlocked copy is copied by the keeper or through staging buffers, out of order)."""
        host = self.host_copy.buffer
        return (
            self.options.stream_resume
            and self.engine.device.type == "cuda"
            and not from_disk
            and host is not None
            and host.pinned
        )

    def stream(self) -> int:
        """Queue the copy from the locked host copy and install the gate; the bytes."""
        host = self.host_copy.buffer
        assert host is not None
        self._streamed = stream_in(host, self._weights, self.engine.memory.weights, self.engine)
        self.via = "stream"
        return self._nbytes

    def wait(self) -> float | None:
        """Block until the last streamed copy is in; its device time (None if not streamed)."""
        marks, self._streamed = self._streamed, None
        return copy_seconds(marks) if marks else None

    def forget(self) -> None:
        """Drop the gate and the marks (a suspend, or a failed resume, after a synchronize)."""
        self.engine.model.gate = None
        self._streamed = None

    def from_host(self, progress: ByteProgress | None) -> int:
        """Copy the weights from the host copy: "copy" (locked here), "keeper" (locked in the
        keeper's process, after a deep suspend unlocked it here) or "staging"."""
        host = self.host_copy.buffer
        if host is None:
            raise FailedPrecondition("no host copy to resume from", reason="NO_HOST_COPY")
        nbytes = self._nbytes
        via = None
        if not host.pinned and self.host_copy.kept:
            try:
                self.host_copy.fill(self._weights, nbytes)
                via = "keeper"
            except TorporError as exc:  # every byte is copied again below
                log.warning("keeper_fill_failed", error=str(exc), reason=exc.reason)
        if via is None:
            host.copy_to(self._weights, nbytes, stage=self.stager or pageable_copy)
            via = "copy" if host.pinned or not host.lockable else "staging"
        self.release_stager()  # torpord counts it only while the runtime is deep-suspended
        self.via = via
        if progress is not None:
            progress(nbytes, nbytes)
        return nbytes

    def from_snapshot(
        self,
        manifest: SnapshotManifest | None,
        store: ChunkStore | None,
        pinner: HostPinner | None,
        progress: ByteProgress | None,
    ) -> int:
        """Stream the snapshot's verified chunks into the weights arena; the bytes moved."""
        if store is None or manifest is None:
            raise FailedPrecondition(
                "resuming from disk needs the chunk store", reason="NO_SNAPSHOT"
            )
        self.via = "disk"
        region = self.placement.regions["weights"]
        return from_disk(manifest, store, region, self.options, pinner, progress)

    def release_stager(self) -> None:
        """Free the deep resume's staging buffers (made again by the next deep suspend)."""
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def close(self) -> None:
        self.release_stager()


def pageable_copy(src: torch.Tensor, dst: torch.Tensor, spans: Sequence[tuple[int, int]]) -> None:
    """Unlocked host pieces straight to the device, without pinned staging buffers: slower,
    and only for a copy still unlocked when no stager is held (a suspend to HOST stopped the
    relock that follows a deep resume; torpord counts a stager only while deep-suspended)."""
    for offset, size in spans:
        dst[offset : offset + size].copy_(src[offset : offset + size])


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


def disk_ring(
    manifest: SnapshotManifest, options: PagerOptions, pinner: HostPinner | None
) -> StagingRing:
    """The staging ring of a read of `manifest`: `staging_buffers` buffers of its largest
    piece, within the runtime's staging limit (torpord's WorkerLoadRequest.staging_bytes)."""
    return StagingRing.within(
        options.staging_limit, options.staging_buffers, manifest.largest_piece, pinner
    )


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
    ring = disk_ring(manifest, options, pinner)
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


def snapshot_to_host(
    manifest: SnapshotManifest | None,
    store: ChunkStore | None,
    arena: Arena,
    nbytes: int,
    options: PagerOptions,
    shared: bool,
    progress: ByteProgress | None,
) -> HostBuffer:
    """A new host copy of the weights arena's first `nbytes`, filled with the snapshot's
    chunks, each read into its place and verified there, as a disk resume verifies it (a
    Prefetch(HOST) from disk). The arena is never mapped and no staging buffer is used: the
    bytes go from disk to host RAM only. Pinned on CUDA, like every host
    copy, so that the next resume from it streams; `shared` for a keeper."""
    if store is None or manifest is None:
        raise FailedPrecondition("resuming from disk needs the chunk store", reason="NO_SNAPSHOT")
    buffer = HostBuffer.for_arena(arena, nbytes, shared=shared)
    total = manifest.weight_bytes
    try:
        # The destination is host memory: each chunk is read into its place, no staging.
        read_pieces_to_host(
            manifest.pieces,
            store,
            buffer.tensor,
            threads=options.reader_threads,
            direct_io=options.direct_io,
            progress=None if progress is None else lambda d: progress(d, total),
        )
    except BaseException:
        buffer.close()  # never keep a copy with an unverified or missing chunk
        raise
    return buffer


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
