"""Building a paged runtime's engine in arenas: a cold load from a checkpoint, or a restore
from a snapshot in a new process (`PagedRuntime.load` and `PagedRuntime.restore`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torpor.checkpoint_files import CheckpointDir
from torpor.store.chunks import ChunkStore
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.runtime import WeightFiller
from torpor.worker.pager.host import HostPinner
from torpor.worker.pager.manifest import SnapshotManifest, environment_here
from torpor.worker.pager.placement import ArenaPlacement, PagerOptions
from torpor.worker.pager.refill import disk_ring
from torpor.worker.pager.snapshot import SnapshotFiller, materialize_files
from torpor.worker.pager.stream import StagingRing
from torpor.worker.progress import ByteProgress


def load_engine(
    model_dir: Path | CheckpointDir,
    engine_options: EngineOptions,
    options: PagerOptions,
    progress: ByteProgress | None,
    filler: WeightFiller | None,
) -> tuple[Engine, ArenaPlacement]:
    """Cold load into arenas (`filler`: another source of the weight bytes; the directory's
    safetensors by default). The arenas are released if the load fails."""
    options.validate()
    placement = ArenaPlacement(options)
    try:
        engine = Engine.load(model_dir, _on(engine_options, options), placement, progress, filler)
    except BaseException:
        placement.close()
        raise
    return engine, placement


def restore_engine(
    manifest: SnapshotManifest,
    store: ChunkStore,
    workdir: Path,
    options: PagerOptions,
    progress: ByteProgress | None,
) -> tuple[Engine, ArenaPlacement, Path]:
    """The engine of a snapshot, in this process: the model's small files written under
    `workdir`, arenas at the recorded addresses when they are free, weights streamed from the
    chunk store and verified, graphs captured again. Returns the model directory too."""
    options.validate()
    model_dir = materialize_files(manifest, store, Path(workdir) / "model")
    placement = ArenaPlacement(options, addresses=manifest.addresses)
    rings: list[StagingRing] = []

    def ring() -> StagingRing:
        backend = placement.backend
        pinner = backend if isinstance(backend, HostPinner) else None
        rings.append(disk_ring(manifest, options, pinner))
        return rings[-1]

    filler = SnapshotFiller(
        manifest,
        store,
        lambda: placement.regions["weights"],
        ring,
        options,
        environment_here(placement.backend.device),
    )
    engine_options = EngineOptions(
        max_batch=manifest.max_batch, max_seq_len=manifest.max_seq_len, dtype=manifest.dtype
    )
    try:
        engine = Engine.load(model_dir, _on(engine_options, options), placement, progress, filler)
    except BaseException:
        placement.close()
        raise
    finally:
        for r in rings:
            r.close()
    return engine, placement, model_dir


def _on(engine_options: EngineOptions, options: PagerOptions) -> EngineOptions:
    """Engine options on the pager's device."""
    return dataclasses.replace(engine_options, device=options.device)
