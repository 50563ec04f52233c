"""Snapshots as torpord sees them: a worker writes the chunks and a manifest chunk; torpord
records the snapshot in the catalog so it outlives the worker and the daemon.

The manifest is the pager's (torpor.worker.pager.manifest); torpord reads only what it needs
from its JSON (the fingerprint and the chunk list), so it never imports the worker.
"""

from __future__ import annotations

import json
from typing import Any

from torpor.errors import DataLoss
from torpor.store.chunks import ChunkRef, ChunkStore
from torpor.store.records import SnapshotInfo
from torpor.store.snapshots import SnapshotStore


def read_manifest(chunks: ChunkStore, manifest_hash: str) -> dict[str, Any]:
    """The manifest JSON stored as chunk `manifest_hash` (verified)."""
    path = chunks.path(manifest_hash)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise DataLoss(
            f"snapshot manifest {manifest_hash} is missing", reason="CHUNK_MISSING"
        ) from exc
    return dict(json.loads(chunks.read(ChunkRef(manifest_hash, size))))


def manifest_chunks(manifest: dict[str, Any]) -> list[ChunkRef]:
    """Every chunk a manifest references: the model files, then the weights in order."""
    refs = [ChunkRef(h, int(n)) for h, n in manifest["files"].values()]
    refs += [ChunkRef(h, int(n)) for _, h, n in manifest["pieces"]]
    return refs


def record_snapshot(store: SnapshotStore, model: str, manifest_hash: str) -> SnapshotInfo:
    """Put a snapshot a worker wrote into the catalog (blocking: run it in a thread).

    The manifest chunk itself is the snapshot's first chunk, so `reading()` finds it and the
    garbage collector keeps it."""
    manifest = read_manifest(store.chunks, manifest_hash)
    refs = [ChunkRef(manifest_hash, store.chunks.path(manifest_hash).stat().st_size)]
    refs += manifest_chunks(manifest)
    # Only chunks the catalog does not know yet need room (the rest are shared).
    reserve = store.new_bytes(refs)
    with store.begin(model, str(manifest["fingerprint"]), reserve_bytes=reserve) as writer:
        for ref in refs:
            writer.add_stored(ref)
        return writer.commit(
            {"manifest_hash": manifest_hash, "fingerprint": manifest["fingerprint"]}
        )


def manifest_hash_of(store: SnapshotStore, snapshot_id: str) -> str:
    """The manifest chunk of a recorded snapshot (what a worker loads it by)."""
    with store.reading(snapshot_id) as contents:
        return str(contents.manifest["manifest_hash"])
