"""The store: the SQLAlchemy catalog and the content-addressed snapshot chunk store.

- `torpor.store.chunks`: hash-named chunk files; no database, usable inside a worker.
- `torpor.store.catalog`: models, bandwidths and events (SQLite or PostgreSQL).
- `torpor.store.snapshots`: snapshots over both, with the capacity budget, GC and scrub.
- `torpor.store.names`: model-name and checkpoint-path validation.

Import the module you need (`from torpor.store.chunks import ChunkStore`): this package
imports nothing, so a worker that uses the chunk store alone never imports SQLAlchemy.
docs/STORE.md describes the layout and the protocols.
"""
