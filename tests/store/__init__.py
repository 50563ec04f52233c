"""Tests of torpor.store: the catalog, the chunk store and snapshots."""
