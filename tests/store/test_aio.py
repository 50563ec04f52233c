"""The async faces run every call off the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import structlog

from tests.store.helpers import FINGERPRINT, MODEL, blob, make_spec
from torpor.errors import NotFound
from torpor.log import bind
from torpor.store.aio import AsyncCatalog, AsyncSnapshotStore
from torpor.store.catalog import Catalog
from torpor.store.records import RegisteredModel
from torpor.store.schema import BandwidthTier
from torpor.store.snapshots import SnapshotStore


async def test_catalog_calls_run_in_another_thread(
    catalog: Catalog, model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acat = AsyncCatalog(catalog)
    await acat.register_model(make_spec(model_root))
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    entered, release = asyncio.Event(), threading.Event()
    seen: dict[str, object] = {}
    real_list = catalog.list_models

    def blocking_list() -> tuple[RegisteredModel, ...]:
        seen["thread"] = threading.get_ident()
        seen["context"] = structlog.contextvars.get_contextvars().get("model")
        loop.call_soon_threadsafe(entered.set)
        release.wait(timeout=30)  # blocks this worker thread until the loop says so
        return real_list()

    monkeypatch.setattr(catalog, "list_models", blocking_list)
    with bind(model=MODEL):
        task = asyncio.create_task(acat.list_models())
    await asyncio.wait_for(entered.wait(), timeout=30)  # the loop runs while the call blocks
    assert not task.done()
    release.set()
    models = await task
    assert [m.spec.name for m in models] == [MODEL]
    assert seen["thread"] != loop_thread
    assert seen["context"] == MODEL  # log context follows the call into the thread


async def test_async_catalog_round_trip(catalog: Catalog) -> None:
    acat = AsyncCatalog(catalog)
    with pytest.raises(NotFound):
        await acat.get_model("nope")
    bw = await acat.record_bandwidth("h", BandwidthTier.HOST_TO_GPU, 55_000, 0.001)
    assert await acat.get_bandwidth("h", BandwidthTier.HOST_TO_GPU) == bw
    event = await acat.append_event("loaded", model=MODEL, detail={"bytes": 1})
    assert await acat.events_after(0) == (event,)


async def test_async_snapshot_admin(store: SnapshotStore) -> None:
    def write() -> str:
        with store.begin(MODEL, FINGERPRINT, reserve_bytes=100) as w:
            w.add_tensor(blob("a", 100))
            return w.commit({}).id

    snapshot_id = await asyncio.to_thread(write)
    astore = AsyncSnapshotStore(store)
    assert [s.id for s in await astore.list(MODEL)] == [snapshot_id]
    assert (await astore.usage()).used_bytes == 100
    assert (await astore.scrub()).dead_writers_removed == 0
    assert (await astore.sweep()).orphan_files_removed == 0
    assert (await astore.delete(snapshot_id)).bytes_freed == 100
    assert await astore.list() == ()
