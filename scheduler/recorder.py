"""The store's side of the daemon: snapshots reserved, recorded and found again, restores
read under the store's read lock, corrupt ones forgotten, transfer bandwidths measured into
the catalog (the policy's restore costs), and the running sweep of what failed or killed
snapshot writes leave behind.

The disk budget has one owner, the policy core (docs/POLICY.md, "The disk budget"). The
snapshots it counts are the ones this recorder tracks: each model's current snapshot
(`latest`), which restores read. The recorder holds them in the store (`SnapshotStore.hold`),
so the store's LRU eviction never takes one; it deletes a model's superseded snapshots when a
new one is recorded; and it measures what the store holds beyond them (`bytes_outside`:
snapshots nobody restores from, leftovers of failed writes) for the core's ledger
(`on_outside`, sent as DiskOutsideMeasured).

Bookkeeping writes (bandwidth samples) never fail a transition: a full catalog disk only
costs the sample (logged and counted, issue 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, TypeVar

from torpor.errors import FailedPrecondition, TorporError
from torpor.log import get_logger
from torpor.scheduler import convert
from torpor.scheduler import snapshots as snaps
from torpor.scheduler.core import Costs, Tier
from torpor.scheduler.metrics import Metrics
from torpor.store.catalog import Catalog
from torpor.store.records import SnapshotInfo
from torpor.store.snapshots import SnapshotStore
from torpor.store.writer import SnapshotWriter

log = get_logger("recorder")

T = TypeVar("T")

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
        self.latest: dict[str, str] = {}  # model -> its current snapshot (held)
        self.infos: dict[str, SnapshotInfo] = {}  # model -> what the store said of it
        self.refused: set[str] = set()  # snapshots that failed a restore: never offered again
        self.on_recorded: Callable[[SnapshotInfo], None] | None = None
        self.on_write_failed: Callable[[str, str, TorporError], None] | None = None
        """(model, runtime id, error): a snapshot write failed and the runtime stayed."""
        self.on_outside: Callable[[int], object] | None = None
        """The store's bytes beyond the tracked snapshots (DiskOutsideMeasured to the core)."""
        self.tracked_models: Callable[[], Collection[str]] = lambda: self.latest.keys()
        """The models whose current snapshot the policy counts (the daemon's registered)."""
        self.gate = WriteGate()
        self._outside_sent: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def known_snapshots(self) -> dict[str, SnapshotInfo]:
        """At start-up (blocking): the newest complete snapshot of every model, each held
        from the store's eviction from now on."""
        for info in self.store.list():
            if info.model not in self.latest:
                self.latest[info.model] = info.id
                self.store.hold(info.id)
                self.infos[info.model] = info
        return dict(self.infos)

    def costs(self, base: Costs) -> Costs:
        """`base` with every bandwidth this host has measured before (blocking)."""
        measured = {
            convert.COST_FIELDS[b.tier]: b.bytes_per_s
            for b in self.catalog.list_bandwidths(self.host)
        }
        return dataclasses.replace(base, **measured)

    # -- writing: reserve first, then the worker writes, then commit ------------------------

    @contextlib.asynccontextmanager
    async def writing(self, model: str, reserve_bytes: int) -> AsyncIterator[PendingSnapshot]:
        """Reserve `reserve_bytes` in the store for a snapshot of `model` before any chunk of
        it is written (STORE_FULL, nothing written, when they cannot fit), and hold off the
        sweep until it is committed or given up. Leaving without `commit` aborts the record;
        chunks the worker wrote are then swept (`write_failed`)."""
        async with self.gate.writing():  # no sweep while chunks are unrecorded
            writer = await _to_the_end(
                snaps.begin, (self.store, model, reserve_bytes), undo=lambda w: w.abort()
            )
            pending = PendingSnapshot(self, model, writer, reserve_bytes)
            try:
                yield pending
            finally:
                if not pending.committed:
                    await _to_the_end(writer.abort, ())

    async def _recorded(self, model: str, info: SnapshotInfo) -> None:
        """A new snapshot of `model` is its current one: held; the ones it supersedes go."""
        old = self.latest.get(model)
        self.latest[model] = info.id
        self.infos[model] = info
        self.store.hold(info.id)
        if old is not None and old != info.id:
            self.store.release(old)
        log.info("snapshot_recorded", model=model, snapshot=info.id, bytes=info.total_bytes)
        if self.on_recorded is not None:
            self.on_recorded(info)
        await self._delete_superseded(model, info.id)
        await self.measure_outside()

    async def _delete_superseded(self, model: str, current: str) -> None:
        """Delete the model's other snapshots: no restore reads them again. One being read
        (an operator's tool) or pinned stays, outside the runtimes' count."""
        try:
            others = await asyncio.to_thread(self.store.list, model, include_corrupt=True)
        except Exception as exc:
            log.warning("superseded_not_listed", model=model, error=repr(exc))
            return
        for info in others:
            if info.id == current or info.pinned:
                continue
            self.store.release(info.id)
            try:
                await asyncio.to_thread(self.store.delete, info.id)
            except Exception as exc:  # the new snapshot is recorded: this never fails it
                log.warning("superseded_not_deleted", snapshot=info.id, error=repr(exc))
            else:
                log.info("snapshot_superseded", model=model, snapshot=info.id)

    # -- restoring: under the store's read lock ----------------------------------------------

    @contextlib.asynccontextmanager
    async def restoring(self, model: str) -> AsyncIterator[str]:
        """Hold the store's read lock on the model's current snapshot for a whole restore
        (a Load from it, or a Resume from DISK), and record the use (LRU order follows use).
        Yields the manifest hash a worker loads it by. While held, the store's eviction skips
        the snapshot and `delete` refuses it (SNAPSHOT_IN_USE)."""
        snapshot_id = self.latest.get(model)
        if snapshot_id is None:
            raise FailedPrecondition(f"model {model!r} has no snapshot", reason="NO_SNAPSHOT")
        stack = contextlib.ExitStack()
        manifest_hash = await asyncio.to_thread(self._open_for_restore, stack, snapshot_id)
        try:
            yield manifest_hash
        finally:
            await asyncio.to_thread(stack.close)

    def _open_for_restore(self, stack: contextlib.ExitStack, snapshot_id: str) -> str:
        contents = stack.enter_context(self.store.reading(snapshot_id))
        try:
            self.store.touch(snapshot_id)
        except TorporError as err:  # a use not recorded never fails the restore
            log.warning("snapshot_touch_failed", snapshot=snapshot_id, error=str(err))
            if self.metrics is not None:
                self.metrics.catalog_write_failed("snapshot_touch")
        return snaps.manifest_hash(contents.manifest)

    # -- what the policy counts ---------------------------------------------------------------

    async def measure_outside(self) -> None:
        """Measure the store's bytes beyond the tracked snapshots of the models the policy
        knows (`tracked_models`), and tell it (`on_outside`). Never raises."""
        if self.on_outside is None:
            return
        models = self.tracked_models()
        tracked = [sid for model, sid in self.latest.items() if model in models]
        try:
            outside = await asyncio.to_thread(self.store.bytes_outside, tracked)
        except Exception as exc:
            log.warning("store_not_measured", error=repr(exc))
            return
        if outside != self._outside_sent:  # a step of the core only when it changed
            self._outside_sent = outside
            self.on_outside(outside)

    def untrack(self, model: str, nbytes: int = 0) -> None:
        """Stop holding the model's current snapshot as the policy's (it is being deleted, or
        its model unregistered). Its bytes are on disk until the store has removed them, so
        they count as outside at once (an upper bound: `nbytes`, or what the store said),
        and `measure_outside` after the deletion makes the count exact again."""
        snapshot_id = self.latest.pop(model, None)
        info = self.infos.pop(model, None)
        if snapshot_id is None:
            return
        self.store.release(snapshot_id)
        if self.on_outside is not None:
            self._outside_sent = (self._outside_sent or 0) + (
                info.total_bytes if info is not None else nbytes
            )
            self.on_outside(self._outside_sent)

    def snapshot_bytes(self, model: str) -> int:
        """Bytes the store holds for the model's current snapshot (0: none known)."""
        info = self.infos.get(model)
        return info.total_bytes if info is not None and info.id == self.latest.get(model) else 0

    async def forget(self, model: str, error: TorporError) -> bool:
        """A snapshot that failed to restore is not offered again: marked corrupt when its
        bytes were bad, with its bad chunk quarantined (so that the next snapshot of the same
        weights writes a good copy instead of sharing the bad one). True when another
        complete snapshot of the model is left; it becomes the one restores read."""
        snapshot_id = self.latest.pop(model, None)
        self.infos.pop(model, None)
        if snapshot_id is not None:
            self.store.release(snapshot_id)
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
                self.infos[model] = info
                self.store.hold(info.id)
                await self.measure_outside()
                return True
        await self.measure_outside()
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
        await self.measure_outside()

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


class PendingSnapshot:
    """A snapshot whose room is reserved and whose chunks a worker is writing."""

    def __init__(
        self, recorder: Recorder, model: str, writer: SnapshotWriter, reserved: int
    ) -> None:
        self.recorder = recorder
        self.model = model
        self.writer = writer
        self.reserved = reserved
        """Bytes reserved: the worker writes no more new bytes than these."""
        self.committed = False

    def _committed(self, info: SnapshotInfo) -> None:
        self.committed = True  # even when the caller was cancelled meanwhile

    async def commit(self, written: snaps.WrittenSnapshot) -> SnapshotInfo:
        """Record what the worker wrote; the snapshot becomes the model's current one."""
        info = await _to_the_end(snaps.commit, (self.writer, written), done=self._committed)
        self.committed = True
        await self.recorder._recorded(self.model, info)
        return info


async def _to_the_end(
    fn: Callable[..., T],
    args: tuple[Any, ...],
    *,
    undo: Callable[[T], object] | None = None,
    done: Callable[[T], object] | None = None,
) -> T:
    """`fn(*args)` in a thread, which a cancellation of the caller never leaves running
    behind its back: the caller waits for it to end, then `done(result)` runs (or, when the
    caller was cancelled, `undo(result)`, in a thread) before the cancellation goes on. A
    reservation is never left held, nor a commit raced by its abort."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        result = await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is None:
            if done is not None:
                done(task.result())
            if undo is not None:
                await asyncio.wait([asyncio.ensure_future(asyncio.to_thread(undo, task.result()))])
        raise
    if done is not None:
        done(result)
    return result
