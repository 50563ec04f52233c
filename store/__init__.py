"""The store: the SQLAlchemy catalog and the content-addressed snapshot chunk store.

- `torpor.store.chunks`: hash-named chunk files; no database, usable inside a worker.
- `torpor.store.catalog`: models, bandwidths and events (SQLite or PostgreSQL).
- `torpor.store.snapshots`: snapshots over both, with the capacity budget, GC and scrub.
- `torpor.store.names`: model-name and checkpoint-path validation.

The names below are re-exported lazily, so `import torpor.store.chunks` in a worker does
not import SQLAlchemy. docs/STORE.md describes the layout and the protocols.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ChunkRef": "chunks",
    "ChunkStore": "chunks",
    "hash_bytes": "chunks",
    "verify": "chunks",
    "Catalog": "catalog",
    "CatalogConfig": "config",
    "SnapshotStoreConfig": "config",
    "SnapshotStore": "snapshots",
    "SnapshotWriter": "writer",
    "validate_model_name": "names",
    "check_source_path": "names",
    "ModelSpec": "records",
    "RegisteredModel": "records",
    "SnapshotInfo": "records",
    "SnapshotContents": "records",
    "Bandwidth": "records",
    "Event": "records",
    "DType": "schema",
    "SnapshotState": "schema",
    "BandwidthTier": "schema",
}

__all__ = [
    "Bandwidth",
    "BandwidthTier",
    "Catalog",
    "CatalogConfig",
    "ChunkRef",
    "ChunkStore",
    "DType",
    "Event",
    "ModelSpec",
    "RegisteredModel",
    "SnapshotContents",
    "SnapshotInfo",
    "SnapshotState",
    "SnapshotStore",
    "SnapshotStoreConfig",
    "SnapshotWriter",
    "check_source_path",
    "hash_bytes",
    "validate_model_name",
    "verify",
]

if TYPE_CHECKING:
    from torpor.store.catalog import Catalog
    from torpor.store.chunks import ChunkRef, ChunkStore, hash_bytes, verify
    from torpor.store.config import CatalogConfig, SnapshotStoreConfig
    from torpor.store.names import check_source_path, validate_model_name
    from torpor.store.records import (
        Bandwidth,
        Event,
        ModelSpec,
        RegisteredModel,
        SnapshotContents,
        SnapshotInfo,
    )
    from torpor.store.schema import BandwidthTier, DType, SnapshotState
    from torpor.store.snapshots import SnapshotStore
    from torpor.store.writer import SnapshotWriter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torpor.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"torpor.store.{module}"), name)
