"""The residency audit trail: every state change, eviction, lease and snapshot, written to
the catalog (one writer task, so ids follow time) and streamed live to `WatchEvents`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from torpor.log import get_logger
from torpor.scheduler import convert
from torpor.scheduler.metrics import Metrics
from torpor.store.catalog import Catalog
from torpor.store.records import Event, NewEvent
from torpor.v1 import admin_pb2

log = get_logger("events")

WRITE_BATCH = 1000  # events per catalog transaction at most


@dataclass(frozen=True)
class Filter:
    kinds: frozenset[str] = frozenset()
    model: str = ""
    gpu: int | None = None

    def accepts(self, event: Event) -> bool:
        return (
            (not self.kinds or event.kind in self.kinds)
            and (not self.model or event.model == self.model)
            and (self.gpu is None or event.gpu == str(self.gpu))
        )


@dataclass(eq=False)  # identity: watchers live in a set
class _Watcher:
    filter: Filter
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)


class EventLog:
    """Appends events in order and fans them out to live watchers."""

    def __init__(self, catalog: Catalog, metrics: Metrics | None = None) -> None:
        self.catalog = catalog
        self.metrics = metrics
        self._pending: asyncio.Queue[NewEvent | None] = asyncio.Queue()
        self._watchers: set[_Watcher] = set()
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write(), name="event-log")

    def append(
        self,
        kind: str,
        *,
        model: str | None = None,
        runtime: str | None = None,
        gpu: int | None = None,
        **detail: Any,
    ) -> None:
        """Record an event (returns at once; the catalog write happens in order, off-loop)."""
        assert kind in convert.EVENT_KINDS, kind
        self._pending.put_nowait(
            NewEvent(
                kind,
                model=model,
                runtime=runtime,
                gpu=None if gpu is None else str(gpu),
                detail={k: v for k, v in detail.items() if v is not None},
                ts=self.catalog.clock(),  # when it happened, not when the writer got to it
            )
        )

    async def _write(self) -> None:
        """Writes what has queued up since the last write in one transaction, so a burst of
        events costs one commit, not one each."""
        closing = False
        while not closing:
            batch: list[NewEvent] = []
            item = await self._pending.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= WRITE_BATCH or self._pending.empty():
                    break
                item = self._pending.get_nowait()
            closing = item is None
            if batch:
                await self._write_batch(batch)

    async def _write_batch(self, batch: list[NewEvent]) -> None:
        try:
            events = await asyncio.to_thread(self.catalog.append_events, batch)
        except Exception as exc:  # the audit trail must not take the daemon down
            # A full catalog disk loses these events (logged and counted), nothing else.
            log.error("event_write_failed", events=len(batch), kind=batch[0].kind, error=repr(exc))
            if self.metrics is not None:
                self.metrics.catalog_write_failed("events")
            return
        for event in events:
            for watcher in self._watchers:
                if watcher.filter.accepts(event):
                    watcher.queue.put_nowait(event)

    async def watch(self, flt: Filter, after_id: int, follow: bool) -> AsyncIterator[Event]:
        """Events after `after_id` from the catalog, then (with `follow`) live ones."""
        watcher = _Watcher(flt)
        if follow:
            self._watchers.add(watcher)
        try:
            last = after_id
            while True:
                batch = await asyncio.to_thread(self.catalog.events_after, last, limit=500)
                for event in batch:
                    last = event.id
                    if flt.accepts(event):
                        yield event
                if len(batch) < 500:
                    break
            while follow:
                event = await watcher.queue.get()
                if event.id > last:
                    last = event.id
                    yield event
        finally:
            self._watchers.discard(watcher)

    def first_id_since(self, since: datetime) -> int:
        """The id just before the first event at or after `since` (blocking: a thread)."""
        last = 0
        while True:
            batch = self.catalog.events_after(last, limit=WRITE_BATCH)
            for event in batch:
                if event.ts.replace(tzinfo=None) >= since.replace(tzinfo=None):
                    return event.id - 1
                last = event.id
            if len(batch) < WRITE_BATCH:
                return last

    def last_id(self) -> int:
        """The newest event's id, 0 if none (blocking: a thread)."""
        last = 0
        while batch := self.catalog.events_after(last, limit=WRITE_BATCH):
            last = batch[-1].id
        return last

    async def close(self) -> None:
        if self._writer is not None:
            self._pending.put_nowait(None)
            await self._writer


def message(event: Event) -> admin_pb2.Event:
    msg = admin_pb2.Event(
        id=event.id,
        time=convert.timestamp(event.ts),
        # A kind this torpord does not know (an older one's, in the catalog) reads UNSPECIFIED.
        kind=convert.EVENT_KINDS.get(event.kind, admin_pb2.EVENT_KIND_UNSPECIFIED),
        model=event.model or "",
        runtime_id=event.runtime or "",
        detail=json.dumps(dict(event.detail), sort_keys=True) if event.detail else "",
        attributes={k: str(v) for k, v in event.detail.items()},
    )
    if event.gpu is not None and event.gpu.isdigit():
        msg.gpu = int(event.gpu)
    return msg
