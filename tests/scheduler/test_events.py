"""The audit trail's writer: order, batching, live watchers and a clean close."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from torpor.scheduler.event_log import EventLog, Filter
from torpor.store.catalog import Catalog


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    with Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}") as cat:
        yield cat


class CountingCatalog:
    """Counts the transactions the writer opens."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.batches: list[int] = []
        self.clock = catalog.clock

    def append_events(self, events):  # type: ignore[no-untyped-def]
        self.batches.append(len(events))
        return self.catalog.append_events(events)


async def test_a_burst_is_written_in_few_transactions_in_order(catalog: Catalog) -> None:
    counting = CountingCatalog(catalog)
    log = EventLog(counting)  # type: ignore[arg-type]
    log.start()
    for i in range(2500):  # a burst: all queued before the writer runs
        log.append("lease_granted", model=f"m{i}")
    await log.close()  # close writes everything that was queued
    events = catalog.events_after(0, limit=10_000)
    assert [e.model for e in events] == [f"m{i}" for i in range(2500)]
    assert sum(counting.batches) == 2500
    assert len(counting.batches) == 3  # 1000 + 1000 + 500: bounded transactions


async def test_watchers_see_live_events_once_and_filtered(catalog: Catalog) -> None:
    log = EventLog(catalog)
    log.start()
    log.append("lease_granted", model="a")
    seen: list[tuple[str, str | None]] = []

    async def watch() -> None:
        async for event in log.watch(Filter(model="a"), after_id=0, follow=True):
            seen.append((event.kind, event.model))
            if len(seen) == 3:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.05)
    log.append("lease_granted", model="b")  # filtered out
    log.append("lease_released", model="a")
    log.append("eviction", model="a", to="HOST")
    await asyncio.wait_for(watcher, 5)
    assert seen == [("lease_granted", "a"), ("lease_released", "a"), ("eviction", "a")]
    await log.close()


async def test_a_failed_write_is_logged_and_the_writer_goes_on(catalog: Catalog) -> None:
    class Flaky(CountingCatalog):
        def append_events(self, events):  # type: ignore[no-untyped-def]
            if not self.batches:
                self.batches.append(-1)
                raise OSError("disk full")
            return super().append_events(events)

    log = EventLog(Flaky(catalog))  # type: ignore[arg-type]
    log.start()
    log.append("lease_granted", model="lost")
    await asyncio.sleep(0.05)
    log.append("lease_granted", model="kept")
    await log.close()
    assert [e.model for e in catalog.events_after(0)] == ["kept"]
