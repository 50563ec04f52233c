"""Carries out the core's transitions on worker processes, and reports how they ended.

Every Load, Resume, Suspend and Drop runs as its own task and ends with exactly one
TransitionCompleted, TransitionFailed or TransitionRolledBack back into the controller, however it
ends: an error, a worker that exits or hangs (every worker call is bounded, see worker_calls.py), or
the task's own cancellation (docs/RELIABILITY.md, "Hangs and wedged models"). A failed transition
kills its worker first (the core's rule: a FAILED runtime holds no bytes), so a worker is never left
half-suspended. The one exception is a suspend whose snapshot found no room (or whose record the
store refused) before anything was unmapped: its worker keeps the runtime as it was, and
TransitionRolledBack says so (issue 12). A restore that fails on an unusable snapshot says so in its
report, and the core plans it again from the next source. Progress of loads and restores is
forwarded as it streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

from torpor.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TorporError,
    Unavailable,
)
from torpor.log import bind, get_logger
from torpor.scheduler import convert, worker_calls
from torpor.scheduler.core import (
    Drop,
    Exchange,
    Footprint,
    Load,
    Resume,
    Suspend,
    Tier,
    TransitionCompleted,
    TransitionFailed,
    TransitionRolledBack,
    WorkerDied,
)
from torpor.scheduler.exchanges import ExchangeRunner
from torpor.scheduler.inflight import InflightCalls
from torpor.scheduler.labels import ACTION_LABELS, LOAD_LABELS, TIER_LABELS
from torpor.scheduler.metrics import Metrics
from torpor.scheduler.snapshots import WrittenSnapshot
from torpor.scheduler.supervisor import Supervisor, WorkerProcess, WorkerSpec
from torpor.store.chunks import ChunkRef
from torpor.store.schema import DType, LoadFormat
from torpor.v1 import common_pb2, worker_pb2

log = get_logger("executor")

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes on Linux, one of them the NUL
_EPOCH = secrets.token_hex(4)
"""This daemon start's token in its workers' socket names. Runtime ids start again at #1 in
every torpord, so names made from the id alone were the same for every daemon and every
restart: one daemon's worker took another's socket path (issue 12)."""

SNAPSHOT_UNUSABLE = frozenset(
    {
        "CHUNK_CORRUPT",
        "CHUNK_MISSING",
        "MANIFEST_INVALID",
        "SNAPSHOT_CORRUPT",
        "SNAPSHOT_INCOMPATIBLE",
        "SNAPSHOT_NOT_FOUND",
        "SNAPSHOT_NOT_LOCAL",
        "NO_SNAPSHOT",
    }
)
"""Reasons of a restore's failure that condemn the snapshot, not the runtime."""
REAP_MARGIN_S = 10.0
"""How long a killed worker may take to be reaped before the report goes out without it."""


def worker_socket(runtime_dir: Path, runtime_id: str) -> Path:
    """The socket of `runtime_id`'s worker: short (a Unix socket path has at most 107 bytes),
    the start's token, then the runtime's (`<runtime_dir>/workers/1a2b3c4d-5e6f7a8b.sock`)."""
    name = f"{_EPOCH}-{hashlib.sha1(runtime_id.encode()).hexdigest()[:8]}"
    return runtime_dir / "workers" / f"{name}.sock"


def check_worker_sockets_fit(runtime_dir: Path) -> None:
    """InvalidArgument unless a worker's socket path under `runtime_dir` fits sun_path:
    torpord checks it at start-up, or else every worker would fail to bind, one by one."""
    longest = worker_socket(runtime_dir, "#1")
    if len(os.fsencode(longest)) > SUN_PATH_MAX:
        raise InvalidArgument(
            f"daemon.runtime_dir {runtime_dir} is too long: its workers' sockets "
            f"({longest}) would exceed the {SUN_PATH_MAX} bytes of a Unix socket path; "
            "choose a shorter runtime directory (TORPOR_DAEMON_RUNTIME_DIR)",
            reason="INVALID_CONFIG",
            metadata={"field": "daemon.runtime_dir", "value": runtime_dir},
        )


@dataclass(frozen=True)
class ModelSource:
    """How to build a model's runtime: the registered spec's parts a worker needs."""

    source: Path
    dtype: str
    max_batch: int
    max_seq_len: int
    estimate: Footprint
    chat_template: str = ""  # the registration's override of the checkpoint's; "": none
    load_format: str = "checkpoint"  # or "dummy": random weights shaped by config.json


@dataclass(frozen=True)
class WorkerDefaults:
    """What every worker gets from torpord's config."""

    runtime_dir: Path
    store: Path
    cuda: bool
    handle_size: str
    graph_pool: str
    python: str
    log_level: str
    stop_grace_s: float
    transition_timeout_s: float
    """How long one worker call of a transition (or one message of its stream) may take."""
    # Every checkpoint file a worker opens must resolve under these (daemon.model_roots).
    model_roots: tuple[Path, ...] = ()


class Executor:
    """Runs transitions; `report` feeds their results to the controller."""

    def __init__(
        self,
        supervisor: Supervisor,
        defaults: WorkerDefaults,
        models: dict[str, ModelSource],
        report: Callable[[Any], None],
        progress: Callable[[str, Tier, int, int, bool], None],
        snapshots: Any,
        metrics: Metrics | None = None,
        calls: InflightCalls | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.defaults = defaults
        self.models = models
        self.report = report
        self.progress = progress
        self.snapshots = snapshots  # the Recorder: writing(model, bytes), restoring(model)
        self.metrics = metrics
        self.incarnations: dict[str, int] = {}
        self.busy: set[str] = set()  # runtimes with a transition running
        self.calls = calls if calls is not None else InflightCalls()  # the API's Generates
        self.restores: dict[str, float] = {}  # runtime -> seconds of its last load or restore
        self._tasks: set[asyncio.Task[None]] = set()

    def worker(self, runtime_id: str) -> WorkerProcess | None:
        return self.supervisor.workers.get(runtime_id)

    def start_exchange(self, action: Exchange) -> None:
        """Run an exchange swap on its two workers (exchanges.py)."""
        self.busy.update((action.out_runtime_id, action.in_runtime_id))
        runner = ExchangeRunner(self, self._safe_report)
        task = asyncio.create_task(runner.run(action), name=f"Exchange-{action.in_runtime_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self, action: Load | Resume | Suspend | Drop) -> None:
        self.busy.add(action.runtime_id)
        task = asyncio.create_task(
            self._run(action), name=f"{type(action).__name__}-{action.runtime_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def restore_seconds(self, runtime_id: str) -> float:
        """How long the last load or restore of `runtime_id` took (0 if none yet)."""
        return self.restores.get(runtime_id, 0.0)

    def abort_requests(self, runtime_id: str) -> None:
        self.calls.abort(runtime_id)

    async def _run(self, action: Load | Resume | Suspend | Drop) -> None:
        kind = ACTION_LABELS[type(action)]
        start = time.perf_counter()
        with bind(model=action.model, runtime=action.runtime_id):
            try:
                event = await self._dispatch(action)
            except RuntimeUnchanged as unchanged:  # issue 12: not a failure of the worker
                self._rolled_back(action, unchanged.error)
                return
            except BaseException as exc:  # every way out is reported (RELIABILITY.md)
                cancelled = _cancelling()
                await self._fail(action, kind, exc, cancelled)
                if cancelled or not isinstance(exc, Exception | asyncio.CancelledError):
                    raise  # our own cancellation (or an interpreter exit) goes on
                return
            self.busy.discard(action.runtime_id)
            log.info("transition_done", action=kind, seconds=round(time.perf_counter() - start, 4))
            self._safe_report(event)

    async def _dispatch(self, action: Load | Resume | Suspend | Drop) -> TransitionCompleted:
        match action:
            case Load():
                return await self._load(action)
            case Resume():
                return await self._resume(action)
            case Suspend():
                return await self._suspend(action)
            case Drop():
                return await self._drop(action)
            case _:
                assert_never(action)

    async def _fail(
        self, action: Load | Resume | Suspend | Drop, kind: str, exc: BaseException, cancelled: bool
    ) -> None:
        """Kill the worker, forget an unusable snapshot, and report TransitionFailed: the
        report goes out in `finally`, even if this task is cancelled again meanwhile."""
        error = _error_of(exc, kind, cancelled)
        log.error("transition_failed", action=kind, error=str(error), reason=error.reason)
        restore = isinstance(action, Load | Resume) and action.source is Tier.DISK
        unusable = restore and error.reason in SNAPSHOT_UNUSABLE
        left, size = False, None
        try:
            await self._kill(action.runtime_id, now=cancelled or error.reason == "WORKER_HUNG")
            if unusable:
                left = await self.snapshots.forget(action.model, error)
                size = self.snapshots.snapshot_bytes(action.model) if left else None
                log.warning("snapshot_unusable", reason=error.reason, another_left=left)
            elif isinstance(action, Suspend) and action.write_snapshot:
                # A write that committed before the suspend failed: the snapshot stays.
                size = self.snapshots.snapshot_bytes(action.model) or None
        finally:
            self.busy.discard(action.runtime_id)
            failed = TransitionFailed(action.runtime_id, action.seq, error, unusable, left, size)
            self._safe_report(failed)

    def _rolled_back(self, action: Load | Resume | Suspend | Drop, error: TorporError) -> None:
        """The transition failed before changing anything: the worker keeps its runtime."""
        kind = ACTION_LABELS[type(action)]
        log.warning("transition_rolled_back", action=kind, reason=error.reason)
        self.busy.discard(action.runtime_id)
        self.snapshots.write_failed(action.model, action.runtime_id, error)
        self._safe_report(TransitionRolledBack(action.runtime_id, action.seq, error))

    def _safe_report(self, event: Any) -> None:
        try:
            self.report(event)
        except Exception as err:  # a stale report the core refuses is not our crash
            # Not `event=`: structlog reserves it, and the TypeError killed this task (#12).
            log.warning("report_refused", report=type(event).__name__, error=str(err))

    # -- the four transitions -------------------------------------------------------------

    async def _load(self, action: Load) -> TransitionCompleted:
        source = self.models[action.model]
        self.incarnations[action.runtime_id] = action.incarnation
        start = time.perf_counter()  # the worker's start is part of a cold restore
        worker = await self.supervisor.spawn(self._spec(action))
        # The core's decision, every part a typed field: where from, where to (a host
        # prefetch ends SUSPENDED_HOST inside this one call) and whether to keep a host copy.
        request = worker_pb2.WorkerLoadRequest(
            model=action.model,
            dtype=convert.dtype_message(DType(source.dtype)),
            max_batch=source.max_batch,
            max_seq_len=source.max_seq_len,
            target=convert.state_name(action.target),
            keep_host_copy=action.keep_host_copy,
            staging_bytes=source.estimate.staging,  # the most its staging buffers may hold
            chat_template=source.chat_template,
        )
        async with self._restoring(action) as manifest_hash:  # the store's read lock
            if manifest_hash is not None:
                request.source = common_pb2.TIER_DISK
                request.snapshot_id = manifest_hash
            else:
                request.source = common_pb2.TIER_SOURCE
                request.model_dir = str(source.source)
                request.model_roots.extend(str(root) for root in self.defaults.model_roots)
                request.load_format = convert.load_format_message(LoadFormat(source.load_format))
            done = await self._transfer(worker, worker.stub.Load, request, action, loading=True)
        status = None if done is None else done.status
        self.restores[action.runtime_id] = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe_load(LOAD_LABELS[action.source], self.restores[action.runtime_id])
        return TransitionCompleted(
            action.runtime_id, action.seq, action.target, self._footprint(status, source)
        )

    async def _resume(self, action: Resume) -> TransitionCompleted:
        worker = self._require_worker(action.runtime_id)
        start = time.perf_counter()
        # RESIDENT, or SUSPENDED_HOST from DISK (a host prefetch: the worker reads the
        # snapshot into its host copy and maps nothing), in this one call.
        request = worker_pb2.WorkerResumeRequest(
            source=convert.tier_name(action.source),
            target=convert.state_name(action.target),
            keep_host_copy=action.keep_host_copy,
        )
        async with self._restoring(action):  # the store's read lock, for a resume from DISK
            done = await self._transfer(worker, worker.stub.Resume, request, action, loading=False)
        moved = 0 if done is None else done.bytes
        seconds = time.perf_counter() - start
        self.restores[action.runtime_id] = seconds
        if self.metrics is not None:
            self.metrics.observe_resume(TIER_LABELS[action.source], seconds)
        if done is not None and not done.streamed:
            # A streamed resume returns while its copy still runs: its seconds are not the
            # copy's, and would make host restores look many times faster than they are.
            await self.snapshots.bandwidth(action.source, moved, seconds)
        return TransitionCompleted(action.runtime_id, action.seq, action.target)

    @contextlib.asynccontextmanager
    async def _restoring(self, action: Load | Resume) -> AsyncIterator[str | None]:
        """A restore from DISK runs under the store's read lock on its snapshot (the manifest
        hash is yielded); any other restore needs none (None)."""
        if action.source is not Tier.DISK:
            yield None
            return
        async with self.snapshots.restoring(action.model) as manifest_hash:
            yield manifest_hash

    async def _transfer(
        self, worker: WorkerProcess, method: Any, request: Any, action: Load | Resume, loading: bool
    ) -> Any:
        """Follow a Load or Resume stream: pass its progress on to the waiting clients and
        return its final `done` message (None if it sent none)."""
        done = None
        what = f"{'load' if loading else 'resume'} from {TIER_LABELS[action.source]}"
        async for event in self._stream(worker, method, request, what):
            if event.HasField("progress"):
                p = event.progress
                self.progress(action.model, action.source, p.bytes_done, p.bytes_total, loading)
            else:
                done = event.done
        return done

    async def _suspend(self, action: Suspend) -> TransitionCompleted:
        worker = self._require_worker(action.runtime_id)
        start = time.perf_counter()
        written = await self._write_snapshot(action, worker) if action.write_snapshot else None
        # The core only suspends a runtime with no calls left, or after AbortRequests (ABORT
        # mode): calls it cancelled may still be unwinding in the worker, so they are ended.
        level = convert.tier_name(action.level)
        suspend = worker_pb2.WorkerSuspendRequest(level=level, abort=True)
        what = f"suspend to {TIER_LABELS[action.level]}"
        reply = await self._call(worker, worker.stub.Suspend, suspend, what)
        if self.metrics is not None:
            self.metrics.observe_suspend(TIER_LABELS[action.level], time.perf_counter() - start)
        state = convert.runtime_state(reply.state)  # checked against the plan by the core
        return TransitionCompleted(action.runtime_id, action.seq, state, snapshot_bytes=written)

    async def _write_snapshot(self, action: Suspend, worker: WorkerProcess) -> int:
        """torpord reserves the room the core counted, the worker writes the chunks within
        it, torpord commits what the worker reports; returns the bytes the store holds for
        the snapshot. Nothing is unmapped yet, so a store without room (STORE_FULL at the
        reservation: no chunk is written), a disk without room (the worker aborted its
        write), or a record the store refuses, leaves the runtime as it was:
        RuntimeUnchanged."""
        asked = written = False
        reserve = action.snapshot_bytes or self.models[action.model].estimate.disk
        try:
            async with self.snapshots.writing(action.model, reserve) as pending:
                asked, done = True, None
                request = worker_pb2.WorkerSnapshotRequest(reserved_bytes=pending.reserved)
                async for event in self._stream(worker, worker.stub.Snapshot, request, "snapshot"):
                    if event.HasField("done"):
                        done = event.done
                if done is None:
                    raise Internal("the worker's snapshot stream ended without a result")
                written = True
                info = await pending.commit(_written_snapshot(done))
        except BaseException as exc:
            # The reservation failed (the worker was not asked), the worker refused for want
            # of room, or torpord's record failed: the worker still holds its runtime as it
            # was (unless it died meanwhile).
            refused = not asked or isinstance(exc, ResourceExhausted) or written
            if isinstance(exc, TorporError) and refused and not worker.exited.is_set():
                raise RuntimeUnchanged(exc) from exc  # its report sweeps the leftovers
            self.snapshots.sweep_soon()  # what the write left: removed once no write runs
            raise
        return int(info.total_bytes)

    async def _drop(self, action: Drop) -> TransitionCompleted:
        await self._kill(action.runtime_id)
        return TransitionCompleted(action.runtime_id, action.seq)

    # -- helpers ------------------------------------------------------------------------

    def on_worker_exit(self, worker: WorkerProcess) -> WorkerDied | None:
        """The event for a worker that exited, or None when the exit was expected or a
        running transition will report it."""
        rid = worker.runtime_id
        self.calls.worker_exited(rid, worker.spec.model)
        if worker.stopping or rid in self.busy:
            return None
        if self.metrics is not None:
            self.metrics.worker_crash(worker.spec.model)
        return WorkerDied(rid, self.incarnations.get(rid, 0), f"exit status {worker.returncode}")

    def _spec(self, action: Load) -> WorkerSpec:
        d = self.defaults
        return WorkerSpec(
            runtime_id=action.runtime_id,
            model=action.model,
            device=self._device(action.gpu),
            socket=worker_socket(d.runtime_dir, action.runtime_id),
            store=d.store,
            handle_size=d.handle_size,
            graph_pool=d.graph_pool,
            log_level=d.log_level,
            python=d.python,
        )

    def _device(self, gpu: int) -> str:
        return f"cuda:{gpu}" if self.defaults.cuda else "cpu"

    def _require_worker(self, runtime_id: str) -> WorkerProcess:
        worker = self.worker(runtime_id)
        if worker is None:
            raise Unavailable(f"runtime {runtime_id} has no worker", reason="NO_WORKER")
        return worker

    def _footprint(self, status: Any, source: ModelSource) -> Footprint:
        if status is None:
            return source.estimate
        arenas = {a.name: a.reserved_bytes for a in status.arenas}
        est = source.estimate
        return Footprint(
            weights=arenas.get("weights", est.weights),
            kv=arenas.get("kv", est.kv),
            graph_pool=arenas.get("graphs", est.graph_pool),
            context=est.context,
            residue=est.residue,
            staging=est.staging,  # the limit its worker was sent at load
            write_staging=est.write_staging,
            exchange_staging=est.exchange_staging,
        )

    async def _kill(self, runtime_id: str, now: bool = False) -> None:
        """Stop the worker (at `now`, SIGKILL at once: it hangs, or torpord is stopping).
        Bounded: a worker that cannot be reaped is logged, never waited for forever."""
        worker = self.worker(runtime_id)
        if worker is None:
            return
        grace = self.defaults.stop_grace_s
        if now:
            worker.stopping = True
            worker.signal(signal.SIGKILL)
        stopping = worker.exited.wait() if now else worker.stop(grace)
        try:
            # stop() takes at most three graces (Shutdown, SIGTERM, SIGKILL), then the reap.
            await asyncio.wait_for(stopping, 3 * grace + REAP_MARGIN_S)
        except TimeoutError:
            worker.signal(signal.SIGKILL)
            log.error("worker_not_reaped", pid=worker.pid, waited_s=3 * grace + REAP_MARGIN_S)

    async def _call(self, worker: WorkerProcess, method: Any, request: Any, what: str) -> Any:
        timeout = self.defaults.transition_timeout_s
        return await worker_calls.unary(worker, method, request, timeout, what)

    def _stream(self, worker: WorkerProcess, method: Any, request: Any, what: str) -> Any:
        timeout = self.defaults.transition_timeout_s
        return worker_calls.stream(worker, method, request, timeout, what)

    async def drain(self, grace_s: float) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)


class RuntimeUnchanged(Exception):
    """A transition failed before it changed the runtime, and its worker lives (a snapshot
    that found no room): reported as TransitionRolledBack, the worker is not stopped."""

    def __init__(self, error: TorporError) -> None:
        super().__init__(str(error))
        self.error = error


def _written_snapshot(done: Any) -> WrittenSnapshot:
    """What a worker's WorkerSnapshotResponse.Done says it wrote."""
    chunks = tuple(ChunkRef(c.hash, c.size) for c in done.chunk_refs)
    if not chunks or chunks[0].hash != done.manifest_hash or not done.fingerprint:
        raise Internal("the worker's snapshot reply lacks its manifest, chunks or fingerprint")
    return WrittenSnapshot(done.manifest_hash, done.fingerprint, chunks)


def _cancelling() -> bool:
    """Is this task being cancelled? (A CancelledError without it is grpc ending a call
    whose worker's channel closed: a failure of the transition, not a cancellation.)"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _error_of(exc: BaseException, kind: str, cancelled: bool) -> TorporError:
    """The typed error a failed transition is reported with."""
    if isinstance(exc, TorporError):
        return exc
    if cancelled:
        return Cancelled(f"the {kind} was cancelled (torpord is stopping)", reason="CANCELLED")
    if isinstance(exc, asyncio.CancelledError):
        return Unavailable(
            f"the worker's channel closed during the {kind}", reason=worker_calls.WORKER_DIED
        )
    return Internal(f"{kind} failed: {exc!r}")


__all__ = ["Executor", "FailedPrecondition", "ModelSource", "WorkerDefaults"]
