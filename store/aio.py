"""Async faces of the catalog and the snapshot store, for the daemon's event loop.

Each call runs the synchronous implementation in a worker thread (`asyncio.to_thread`),
so the loop never waits on the database or the disk. docs/STORE.md ("Off the event loop")
says why a thread and not an async engine: one implementation serves the daemon, the
workers and the CLI; SQLite has no truly asynchronous driver (aiosqlite is a thread too);
scrub and garbage collection do file I/O that must leave the loop anyway; and `to_thread`
carries contextvars, so log context bound with `torpor.log.bind` follows the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from torpor.store.capacity import StoreUsage
from torpor.store.catalog import Catalog
from torpor.store.records import (
    Bandwidth,
    Event,
    GcReport,
    ModelSpec,
    RegisteredModel,
    ScrubReport,
    SnapshotInfo,
    SweepReport,
)
from torpor.store.schema import BandwidthTier
from torpor.store.snapshots import SnapshotStore


class AsyncCatalog:
    """`Catalog` for asyncio code: the same methods, awaited, each run in a thread."""

    def __init__(self, catalog: Catalog) -> None:
        self.sync = catalog

    async def register_model(self, spec: ModelSpec, *, replace: bool = False) -> RegisteredModel:
        return await asyncio.to_thread(self.sync.register_model, spec, replace=replace)

    async def get_model(self, name: str) -> RegisteredModel:
        return await asyncio.to_thread(self.sync.get_model, name)

    async def list_models(self) -> tuple[RegisteredModel, ...]:
        return await asyncio.to_thread(self.sync.list_models)

    async def set_model_pinned(self, name: str, pinned: bool) -> RegisteredModel:
        return await asyncio.to_thread(self.sync.set_model_pinned, name, pinned)

    async def delete_model(self, name: str) -> None:
        await asyncio.to_thread(self.sync.delete_model, name)

    async def record_bandwidth(
        self, host: str, tier: BandwidthTier, nbytes: int, seconds: float
    ) -> Bandwidth:
        return await asyncio.to_thread(self.sync.record_bandwidth, host, tier, nbytes, seconds)

    async def get_bandwidth(self, host: str, tier: BandwidthTier) -> Bandwidth | None:
        return await asyncio.to_thread(self.sync.get_bandwidth, host, tier)

    async def list_bandwidths(self, host: str | None = None) -> tuple[Bandwidth, ...]:
        return await asyncio.to_thread(self.sync.list_bandwidths, host)

    async def append_event(
        self,
        kind: str,
        *,
        model: str | None = None,
        runtime: str | None = None,
        gpu: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Event:
        return await asyncio.to_thread(
            self.sync.append_event, kind, model=model, runtime=runtime, gpu=gpu, detail=detail
        )

    async def events_after(
        self, after_id: int = 0, *, limit: int = 1000, model: str | None = None
    ) -> tuple[Event, ...]:
        return await asyncio.to_thread(self.sync.events_after, after_id, limit=limit, model=model)

    async def prune_events(self, before: datetime) -> int:
        return await asyncio.to_thread(self.sync.prune_events, before)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)


class AsyncSnapshotStore:
    """The admin side of `SnapshotStore` for asyncio code (list, delete, GC, scrub).

    Writing and restoring snapshots is bulk I/O done by workers, which call the
    synchronous store from their own threads.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self.sync = store

    async def list(
        self, model: str | None = None, *, include_corrupt: bool = False, all_stores: bool = False
    ) -> tuple[SnapshotInfo, ...]:
        return await asyncio.to_thread(
            self.sync.list, model, include_corrupt=include_corrupt, all_stores=all_stores
        )

    async def get(self, snapshot_id: str) -> SnapshotInfo:
        return await asyncio.to_thread(self.sync.get, snapshot_id)

    async def latest(self, model: str, fingerprint: str) -> SnapshotInfo | None:
        return await asyncio.to_thread(self.sync.latest, model, fingerprint)

    async def touch(self, snapshot_id: str) -> None:
        await asyncio.to_thread(self.sync.touch, snapshot_id)

    async def set_pinned(self, snapshot_id: str, pinned: bool) -> SnapshotInfo:
        return await asyncio.to_thread(self.sync.set_pinned, snapshot_id, pinned)

    async def mark_corrupt(self, snapshot_id: str, problem: str) -> bool:
        return await asyncio.to_thread(self.sync.mark_corrupt, snapshot_id, problem)

    async def delete(self, snapshot_id: str) -> GcReport:
        return await asyncio.to_thread(self.sync.delete, snapshot_id)

    async def delete_model_snapshots(self, model: str) -> int:
        return await asyncio.to_thread(self.sync.delete_model_snapshots, model)

    async def usage(self) -> StoreUsage:
        return await asyncio.to_thread(self.sync.usage)

    async def collect_garbage(self) -> GcReport:
        return await asyncio.to_thread(self.sync.collect_garbage)

    async def scrub(self, *, deep: bool = False) -> ScrubReport:
        return await asyncio.to_thread(self.sync.scrub, deep=deep)

    async def sweep(self, *, min_age_s: float = 0.0) -> SweepReport:
        return await asyncio.to_thread(self.sync.sweep, min_age_s=min_age_s)
