"""Snapshots as torpord sees them: torpord reserves the room, a worker writes the chunks and
its manifest chunk, and torpord commits what the worker reports into the catalog, so that the
snapshot outlives the worker and the daemon.

The manifest's schema is shared (`torpor.store.snapshot_manifest`); torpord never reads the
manifest back: the worker's reply names the fingerprint and every chunk
(`WorkerSnapshotResponse.Done`), and the catalog keeps the manifest's hash, which is what a
worker loads the snapshot by.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torpor.store.chunks import ChunkRef
from torpor.store.records import SnapshotInfo
from torpor.store.snapshots import SnapshotStore
from torpor.store.writer import SnapshotWriter


@dataclass(frozen=True, slots=True)
class WrittenSnapshot:
    """What a worker wrote for a snapshot (from its Snapshot reply)."""

    manifest_hash: str
    fingerprint: str
    chunks: tuple[ChunkRef, ...]
    """Every chunk, the manifest first: all already durable in the chunk store."""


def begin(store: SnapshotStore, model: str, reserve_bytes: int) -> SnapshotWriter:
    """Reserve room for a snapshot of `model` before any of its chunks is written (blocking:
    run it in a thread). STORE_FULL, with nothing changed, when it cannot fit."""
    return store.begin(model, None, reserve_bytes=reserve_bytes)


def commit(writer: SnapshotWriter, written: WrittenSnapshot) -> SnapshotInfo:
    """Reference the chunks the worker wrote and make the snapshot visible (blocking).

    The manifest chunk is the snapshot's first chunk, so `reading()` finds it and the garbage
    collector keeps it."""
    for ref in written.chunks:
        writer.add_stored(ref)
    document = {"manifest_hash": written.manifest_hash, "fingerprint": written.fingerprint}
    return writer.commit(document, fingerprint=written.fingerprint)


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """The manifest chunk named by a recorded snapshot's catalog document."""
    return str(manifest["manifest_hash"])
