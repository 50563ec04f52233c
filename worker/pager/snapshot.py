"""Writing a runtime's weights to the chunk store, and restoring them into a new worker.

Weights are immutable after load, so a snapshot is written once and reused by every later
disk-level suspend; chunks are cut at tensor boundaries (and every `max_chunk` bytes inside a
large tensor), so a second snapshot of the same weights stores nothing new and a fine-tune
that changes a few tensors stores only those.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torpor.checkpoint_files import CheckpointDir, as_checkpoint
from torpor.errors import DataLoss, ResourceExhausted
from torpor.store import private
from torpor.store.chunks import ChunkRef, ChunkStore, hash_bytes
from torpor.worker.engine.layout import Layout
from torpor.worker.engine.runtime import WeightFiller
from torpor.worker.engine.weights import WeightSource
from torpor.worker.pager.host import HostPinner
from torpor.worker.pager.manifest import MODEL_FILES, Environment, Piece, SnapshotManifest
from torpor.worker.pager.stream import StagingRing, StreamStats, stream_pieces

MAX_CHUNK = 64 << 20


class Reservation:
    """The bytes torpord reserved in the store for a snapshot's new chunks (reserve first,
    issue 13): no chunk is written that would take the new bytes past them. None: no limit
    (a snapshot taken outside torpord, or a disk suspend reusing one already written)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        """Count `size` new bytes, before they are written; ResourceExhausted if over."""
        if self.limit is not None and self.used + size > self.limit:
            raise ResourceExhausted(
                f"the snapshot needs more than the {self.limit} bytes torpord reserved for it "
                f"({self.used} written, {size} more)",
                reason="SNAPSHOT_OVER_RESERVATION",
                metadata={"reserved_bytes": self.limit, "used_bytes": self.used, "more": size},
            )
        self.used += size


def put_new(store: ChunkStore, data: Any, reservation: Reservation) -> ChunkRef:
    """Store one chunk unless the store has it (dedup); a new one is counted first."""
    view = memoryview(data).cast("B")
    ref = ChunkRef(hash_bytes(view), view.nbytes)
    if not store.has(ref):
        reservation.take(ref.size)
        store.put(view)
    return ref


@dataclass(frozen=True)
class SnapshotReport:
    """A written snapshot: its manifest, and how many bytes were new on disk."""

    manifest: SnapshotManifest
    new_bytes: int
    seconds: float


def pieces_of(layout: Layout, max_chunk: int = MAX_CHUNK) -> Iterator[tuple[int, int]]:
    """(offset, size) of every chunk of a region: each tensor, cut every max_chunk bytes."""
    for entry in layout.entries:
        for start in range(entry.offset, entry.end, max_chunk):
            yield start, min(max_chunk, entry.end - start)


def write_pieces(
    source: torch.Tensor,
    layout: Layout,
    store: ChunkStore,
    pinner: HostPinner | None,
    progress: Callable[[int], None] | None = None,
    reservation: Reservation | None = None,
    staging_limit: int = 0,
) -> tuple[tuple[Piece, ...], int]:
    """Store every chunk of `source` (the region's flat uint8 view, on the host or a GPU);
    return the pieces and the bytes that were not in the store before. Device bytes go
    through one staging buffer, the size of the largest chunk, within `staging_limit`."""
    reservation = reservation or Reservation()
    ring = None
    if source.device.type != "cpu":
        largest = max((size for _, size in pieces_of(layout)), default=0)
        ring = StagingRing.within(staging_limit, 1, largest, pinner)
    staging = ring.buffers[0] if ring is not None else None
    pieces, new, done = [], 0, 0
    try:
        for offset, size in pieces_of(layout):
            chunk = source[offset : offset + size]
            if staging is not None:  # device bytes go through a pinned buffer
                staging.tensor[:size].copy_(chunk)
                chunk = staging.tensor[:size]
            data = chunk.numpy().data
            ref = ChunkRef(hash_bytes(data), size)
            if not store.has(ref):  # dedup: a chunk already stored is not written again
                reservation.take(size)
                ref = store.put(data)
                new += size
            pieces.append(Piece(offset, ref))
            done += size
            if progress is not None:
                progress(done)
    finally:
        if ring is not None:
            ring.close()
    return tuple(pieces), new


def read_model_files(model_dir: Path | CheckpointDir) -> dict[str, bytes]:
    """The model's small files (config, tokenizer), read when the runtime is loaded.

    A snapshot stores these bytes, not what the checkpoint holds by then: it copies what the
    runtime was loaded from, and a file turned into a symlink out of the model roots later
    is never read (issue 12). They are read through CheckpointDir's checks like every
    checkpoint file."""
    ckpt = as_checkpoint(model_dir)
    return {name: ckpt.read_bytes(name) for name in MODEL_FILES if ckpt.exists(name)}


def store_model_files(
    files: Mapping[str, bytes], store: ChunkStore, reservation: Reservation | None = None
) -> dict[str, ChunkRef]:
    """Put the small files into the store, so a restore needs no source checkpoint."""
    reservation = reservation or Reservation()
    return {name: put_new(store, data, reservation) for name, data in files.items()}


def materialize_files(manifest: SnapshotManifest, store: ChunkStore, out_dir: Path) -> Path:
    """Write the snapshot's model files into `out_dir` (verified) and return it."""
    private.make_dirs(out_dir)
    for name, ref in manifest.files.items():
        if name not in MODEL_FILES:  # a manifest names files; never a path out of out_dir
            raise DataLoss(f"snapshot manifest names an unexpected file {name!r}")
        fd = os.open(out_dir / name, _PRIVATE_WRITE, private.PRIVATE_FILE)
        with os.fdopen(fd, "wb") as f:
            f.write(store.read(ref))
    return out_dir


# Write a restored model file anew, never through a symlink left in the scratch directory.
_PRIVATE_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotFiller(WeightFiller):
    """Fills a new runtime's weights region from a snapshot, through the staging ring."""

    def __init__(
        self,
        manifest: SnapshotManifest,
        store: ChunkStore,
        region: Callable[[], torch.Tensor],
        ring: Callable[[], StagingRing],
        options: Any,
        here: Environment,
    ) -> None:
        self.manifest = manifest
        self.store = store
        self.region = region  # the placed weights region, once placed
        self.ring = ring
        self.options = options
        self.here = here
        self.stats: StreamStats | None = None

    def check(self, plan: list[WeightSource], layout: Layout) -> None:
        self.manifest.check_restorable(self.here, layout.to_json())

    def fill(
        self,
        plan: list[WeightSource],
        tensors: dict[str, torch.Tensor],
        progress: Callable[[int], None] | None,
    ) -> None:
        self.stats = stream_pieces(
            self.manifest.pieces,
            self.store,
            self.region(),
            self.ring(),
            threads=self.options.reader_threads,
            direct_io=self.options.direct_io,
            progress=progress,
        )
