"""The store's side of the daemon: snapshots recorded and found again, corrupt ones
forgotten, transfer bandwidths measured into the catalog (the policy's restore costs), and
the running sweep of what failed or killed snapshot writes leave behind.

Bookkeeping writes (bandwidth samples) never fail a transition: a full catalog disk only
costs the sample (logged and counted, issue 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
from collections.abc import AsyncIterator, Callable

from torpor.errors import TorporError
from torpor.log import get_logger
from torpor.scheduler import convert
from torpor.scheduler import snapshots as snaps
from torpor.scheduler.core import Costs, Tier
from torpor.scheduler.metrics import Metrics
from torpor.store.catalog import Catalog
from torpor.store.records import SnapshotInfo
from torpor.store.snapshots import SnapshotStore

log = get_logger("recorder")

_HASH = re.compile(r"[0-9a-f]{32}")  # a chunk's name (store.chunks.check_hash)


class WriteGate:
    """Snapshot writes in flight (shared) against the sweep (exclusive).

    A worker's chunks are orphans in the catalog's eyes until torpord records them, so the
    sweep must never run between the first chunk and the record. New writes wait for a
    running sweep (milliseconds); a sweep waits until no write is in flight.
    """

    def __init__(self) -> None:
        self._writes = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweeping = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._sweeping:
            self._writes += 1
            self._idle.clear()
        try:
            yield
        finally:
            self._writes -= 1
            if self._writes == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def sweeping(self) -> AsyncIterator[None]:
        async with self._sweeping:
            await self._idle.wait()
            yield


class Recorder:
    """Blocking store calls, each run in a thread so the event loop never waits on them."""

    def __init__(
        self,
        catalog: Catalog,
        store: SnapshotStore,
        costs: Callable[[], Costs],
        on_costs: Callable[[Costs], None],
        metrics: Metrics | None = None,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.current_costs = costs
        self.on_costs = on_costs
        self.metrics = metrics
        self.host = socket.gethostname()
        self.latest: dict[str, str] = {}  # model -> snapshot id
        self.refused: set[str] = set()  # snapshots that failed a restore: never offered again
        self.on_recorded: Callable[[SnapshotInfo], None] | None = None
        self.on_write_failed: Callable[[str, str, TorporError], None] | None = None
        """(model, runtime id, error): a snapshot write failed and the runtime stayed."""
        self.gate = WriteGate()
        self._tasks: set[asyncio.Task[None]] = set()

    def known_snapshots(self) -> dict[str, str]:
        """At start-up (blocking): the newest complete snapshot of every model."""
        for info in self.store.list():
            self.latest.setdefault(info.model, info.id)
        return dict(self.latest)

    def costs(self, base: Costs) -> Costs:
        """`base` with every bandwidth this host has measured before (blocking)."""
        measured = {
            convert.COST_FIELDS[b.tier]: b.bytes_per_s
            for b in self.catalog.list_bandwidths(self.host)
        }
        return dataclasses.replace(base, **measured)

    async def record(self, model: str, manifest_hash: str) -> None:
        info = await asyncio.to_thread(snaps.record_snapshot, self.store, model, manifest_hash)
        self.latest[model] = info.id
        log.info("snapshot_recorded", model=model, snapshot=info.id, bytes=info.total_bytes)
        if self.on_recorded is not None:
            self.on_recorded(info)

    async def manifest_for(self, model: str) -> str:
        snapshot_id = self.latest.get(model)
        if snapshot_id is None:
            from torpor.errors import FailedPrecondition

            raise FailedPrecondition(f"model {model!r} has no snapshot", reason="NO_SNAPSHOT")
        return await asyncio.to_thread(snaps.manifest_hash_of, self.store, snapshot_id)

    async def forget(self, model: str, error: TorporError) -> bool:
        """A snapshot that failed to restore is not offered again: marked corrupt when its
        bytes were bad, with its bad chunk quarantined (so that the next snapshot of the same
        weights writes a good copy instead of sharing the bad one). True when another
        complete snapshot of the model is left; it becomes the one restores read."""
        snapshot_id = self.latest.pop(model, None)
        if snapshot_id is not None:
            self.refused.add(snapshot_id)
            if error.reason in ("CHUNK_CORRUPT", "CHUNK_MISSING"):
                await self._mark_corrupt(snapshot_id, error)
        try:
            others = await asyncio.to_thread(self.store.list, model)
        except TorporError as err:
            log.error("snapshot_list_failed", model=model, error=str(err))
            return False
        for info in others:
            if info.id not in self.refused:
                self.latest[model] = info.id
                return True
        return False

    async def _mark_corrupt(self, snapshot_id: str, error: TorporError) -> None:
        chunk = error.metadata.get("hash")
        chunk = chunk if chunk and _HASH.fullmatch(chunk) else None
        try:
            await asyncio.to_thread(self.store.mark_corrupt, snapshot_id, error.message, chunk)
        except Exception as exc:  # the restore's report must still go out
            log.error("mark_corrupt_failed", snapshot=snapshot_id, error=repr(exc))

    async def bandwidth(self, tier: Tier, nbytes: int, seconds: float) -> None:
        """Fold a measured restore into the catalog, and the policy's costs."""
        which = convert.BANDWIDTH_TIERS[tier]
        if which is None or nbytes <= 0 or seconds <= 0:
            return
        try:
            measured = await asyncio.to_thread(
                self.catalog.record_bandwidth, self.host, which, nbytes, seconds
            )
        except Exception as exc:  # a sample lost must never fail the resume it measured
            log.warning("bandwidth_not_recorded", tier=which.value, error=repr(exc))
            if self.metrics is not None:
                self.metrics.catalog_write_failed("bandwidth")
            return
        field = convert.COST_FIELDS[which]
        self.on_costs(dataclasses.replace(self.current_costs(), **{field: measured.bytes_per_s}))

    # -- failed writes and the running sweep ------------------------------------------------

    def write_failed(self, model: str, runtime_id: str, error: TorporError) -> None:
        """A snapshot write failed and its runtime was left as it was: say so (event,
        metric), and sweep the chunks it wrote before failing as soon as no write runs."""
        log.error(
            "snapshot_failed",
            model=model,
            runtime=runtime_id,
            reason=error.reason,
            error=str(error),
        )
        if self.metrics is not None:
            self.metrics.snapshot_failed(error.reason)
        if self.on_write_failed is not None:
            self.on_write_failed(model, runtime_id, error)
        self.sweep_soon()

    def sweep_soon(self) -> None:
        """Sweep in the background (after the snapshot writes in flight end)."""
        task = asyncio.create_task(self.sweep(), name="store-sweep")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sweep(self) -> None:
        """One sweep of the chunk store (store.sweep), while no snapshot write is in flight.
        Never raises: a sweep that fails is logged and tried again next time."""
        try:
            async with self.gate.sweeping():
                report = await asyncio.to_thread(self.store.sweep)
        except Exception as exc:
            log.warning("store_sweep_failed", error=repr(exc))
            return
        if self.metrics is not None:
            self.metrics.store_swept(report.temp_files_removed + report.orphan_files_removed)

    def start_sweeping(self, interval_s: float) -> None:
        """Sweep every `interval_s` seconds until `close` (0: never)."""
        if interval_s > 0:
            task = asyncio.create_task(self._sweep_every(interval_s), name="store-sweeper")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sweep_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.sweep()

    async def close(self) -> None:
        """Stop the sweeps (idempotent)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
