"""The `torpor.v1.Worker` service: torpord's handle on one runtime in this process.

A worker holds at most one runtime. It obeys: Load (cold, or from a snapshot by its manifest
hash), Generate, Suspend, Resume, Snapshot, Status, Shutdown. It decides nothing: what
torpord decided (the source, the target, whether to keep a host copy) comes as typed fields
and is checked, never inferred. Every error is a typed status (torpor.rpc_status). Long
operations stream their progress.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from torpor import chat_template
from torpor.checkpoint_files import CheckpointDir
from torpor.errors import Aborted, FailedPrecondition, InvalidArgument
from torpor.exchange_board import Board
from torpor.log import bind, get_logger
from torpor.rpc_status import servicer_errors
from torpor.store.chunks import ChunkRef, ChunkStore
from torpor.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from torpor.worker import convert
from torpor.worker.engine.dummy import DummyFiller, seed_for
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import FinishReason, GenerationRequest, RequestDelta
from torpor.worker.engine.tokenizer import Tokenizer
from torpor.worker.pager.manifest import SnapshotManifest
from torpor.worker.pager.paged_state import PagedState, SuspendLevel
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.pager.runtime import PagedRuntime
from torpor.worker.pager.snapshot import Reservation, put_new
from torpor.worker.pager.stream import staging_bytes

log = get_logger("worker")

T = TypeVar("T")
Emit = Callable[..., None]  # the arguments of one progress message

_DONE = object()


@dataclass(frozen=True)
class WorkerConfig:
    """What torpord starts a worker with."""

    device: str  # cpu, cuda or cuda:N
    store: Path  # the chunk store root (snapshots)
    workdir: Path  # private scratch (a restored model's small files)
    pager: PagerOptions


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, on_shutdown: Callable[[], None]) -> None:
        self.config = config
        self.store = ChunkStore(config.store)
        self.runtime: PagedRuntime | None = None
        self.model = ""
        self.snapshot_id = ""
        self._loading = threading.Lock()
        self._on_shutdown = on_shutdown

    # -- load ------------------------------------------------------------------------------

    @servicer_errors
    def Load(
        self, request: worker_pb2.WorkerLoadRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        if not self._loading.acquire(blocking=False) or self.runtime is not None:
            raise FailedPrecondition("this worker already holds a runtime", reason="ALREADY_LOADED")
        try:
            with bind(model=request.model):
                start = time.perf_counter()
                target = convert.target(request.target, "load")
                yield from _with_progress(
                    lambda emit: self._load(request, target, emit),
                    lambda phase, done, total: worker_pb2.WorkerLoadResponse(
                        progress=worker_pb2.WorkerLoadResponse.Progress(
                            phase=phase, bytes_done=done, bytes_total=total
                        )
                    ),
                )
                assert self.runtime is not None
                timings = self.runtime.engine.timings
                yield worker_pb2.WorkerLoadResponse(
                    done=worker_pb2.WorkerLoadResponse.Done(
                        timings=worker_pb2.LoadTimings(
                            weights=convert.duration(timings.weights_s),
                            graphs=convert.duration(timings.graphs_s),
                            total=convert.duration(time.perf_counter() - start),
                        ),
                        status=self._status(),
                    )
                )
        finally:
            self._loading.release()

    def _load(self, request: worker_pb2.WorkerLoadRequest, target: PagedState, emit: Emit) -> None:
        _check_load(request, target)
        pager = dataclasses.replace(
            self.config.pager,
            host_copy=request.keep_host_copy,
            staging_limit=request.staging_bytes,  # torpord counts it in its host budget
        )

        def weights(done: int, total: int) -> None:
            emit(worker_pb2.LOAD_PHASE_WEIGHTS, done, total)

        if request.source == common_pb2.TIER_DISK:
            manifest = self._manifest(request.snapshot_id)
            runtime = PagedRuntime.restore(
                manifest, self.store, self.config.workdir, pager, weights
            )
            self.snapshot_id = request.snapshot_id
        else:
            options = EngineOptions(
                max_batch=request.max_batch or 8,
                max_seq_len=request.max_seq_len,
                dtype=convert.dtype(request.dtype),
            )
            model_dir = CheckpointDir.confined(request.model_dir, request.model_roots)
            # Dummy weights: random from a seed of the model's name, shaped by config.json.
            dummy = convert.load_format(request.load_format) == "dummy"
            filler = DummyFiller(seed_for(request.model)) if dummy else None
            runtime = PagedRuntime.load(model_dir, options, pager, weights, filler)
        if request.chat_template and runtime.engine.tokenizer is not None:
            runtime.engine.tokenizer.use_chat_template(request.chat_template)
        self.runtime = runtime
        self.model = request.model
        if target is PagedState.SUSPENDED_HOST:
            # A host prefetch: built on the device (graphs are captured there), then its
            # weights copied out and every arena unmapped, before this call answers.
            nbytes = runtime.engine.memory.weights.nbytes
            emit(worker_pb2.LOAD_PHASE_HOST_COPY, 0, nbytes)
            runtime.suspend(SuspendLevel.HOST)
            emit(worker_pb2.LOAD_PHASE_HOST_COPY, nbytes, nbytes)

    def _manifest(self, snapshot_id: str) -> SnapshotManifest:
        path = self.store.path(snapshot_id)
        if not path.is_file():
            raise InvalidArgument(
                f"no snapshot manifest {snapshot_id} in {self.config.store}",
                reason="SNAPSHOT_NOT_FOUND",
            )
        ref = ChunkRef(snapshot_id, path.stat().st_size)
        return SnapshotManifest.loads(self.store.read(ref).decode())

    # -- generate --------------------------------------------------------------------------

    @servicer_errors
    def Generate(
        self, request: worker_pb2.WorkerGenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        runtime = self._resident("generate")
        engine = runtime.engine
        start = time.perf_counter()
        which = request.WhichOneof("prompt")
        if which == "prompt_text":
            prompt = tuple(engine.encode(request.prompt_text))
        elif which == "prompt_token_ids":
            prompt = tuple(request.prompt_token_ids.ids)
        elif which == "prompt_chat":
            prompt = tuple(engine.encode_chat(request.prompt_chat))
        else:
            raise InvalidArgument("the prompt is empty", reason="EMPTY_PROMPT")
        params = convert.sampling(request.sampling, len(prompt), engine.options.max_seq_len)
        request_id = request.request_id or f"w{os.getpid()}-{time.monotonic_ns()}"
        with bind(request=request_id, model=self.model):
            stream = runtime.loop.submit(GenerationRequest(request_id, prompt, params))
            context.add_callback(stream.cancel)  # the caller went away: stop generating
            first = None
            generated = 0
            for delta in stream:
                first = first if first is not None else time.perf_counter() - start
                generated += len(delta.token_ids)
                chunk = common_pb2.GenerateChunk(token_ids=delta.token_ids, text=delta.text)
                if params.logprobs:
                    chunk.logprobs.extend(delta.logprobs)
                    chunk.token_logprobs.extend(_token_logprobs(engine.tokenizer, delta))
                if delta.finish is FinishReason.ABORT:
                    # Ended by a suspend with abort (an eviction), not by its own end: the
                    # caller must see an error, not a request that finished short.
                    if delta.token_ids:
                        yield chunk
                    raise Aborted(
                        f"request {request_id} was aborted: its runtime is being suspended",
                        reason="REQUEST_ABORTED",
                        metadata={"generated_tokens": generated},
                    )
                if delta.finish is not None:
                    chunk.usage.CopyFrom(
                        common_pb2.Usage(
                            prompt_tokens=len(prompt),
                            completion_tokens=generated,
                            finish_reason=convert.FINISH[delta.finish],
                            timings=common_pb2.GenerateTimings(
                                first_token=convert.duration(first),
                                total=convert.duration(time.perf_counter() - start),
                            ),
                        )
                    )
                yield chunk

    # -- suspend, resume, snapshot -----------------------------------------------------------

    @servicer_errors
    def Suspend(
        self, request: worker_pb2.WorkerSuspendRequest, context: grpc.ServicerContext
    ) -> Any:
        runtime = self._runtime()
        before = runtime.memory()
        report = runtime.suspend(
            convert.level(request.level), abort=request.abort, store=self.store
        )
        after = runtime.memory()
        return worker_pb2.WorkerSuspendResponse(
            state=convert.STATES[runtime.residency],
            gpu_bytes_released=report.gpu_bytes_released,
            host_bytes_released=max(0, before.host_bytes - after.host_bytes),
            gpu_bytes_remaining=after.gpu_bytes,
            total=convert.duration(report.seconds),
        )

    @servicer_errors
    def Resume(
        self, request: worker_pb2.WorkerResumeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        runtime = self._runtime()
        source = convert.resume_source(request.source)
        target = convert.target(request.target, "resume")
        report = yield from _with_progress(
            lambda emit: runtime.resume(
                self.store,
                emit,
                source=source,
                target=target,
                keep_host_copy=request.keep_host_copy,
            ),
            lambda d, t: worker_pb2.WorkerResumeResponse(
                progress=common_pb2.TransferProgress(
                    tier=request.source, bytes_done=d, bytes_total=t
                )
            ),
        )
        yield worker_pb2.WorkerResumeResponse(
            done=worker_pb2.WorkerResumeResponse.Done(
                tier=convert.TIERS[report.tier],
                bytes=report.bytes,
                checkpoint_restore=convert.duration(report.phases.get("restore", 0.0)),
                map=convert.duration(
                    report.phases.get("map", 0.0) + report.phases.get("finish", 0.0)
                ),
                copy=convert.duration(
                    report.phases.get("refill", report.phases.get("refill_enqueued", 0.0))
                ),
                total=convert.duration(report.seconds),
                streamed=report.streamed,
            )
        )

    @servicer_errors
    def Exchange(
        self, request: worker_pb2.WorkerExchangeRequest, context: grpc.ServicerContext
    ) -> Any:
        side, path, timeout = convert.exchange(request)
        runtime = self._runtime()
        board = Board.open(path)
        try:
            report = runtime.exchange(side, board, timeout)
        finally:
            board.close()
        return worker_pb2.WorkerExchangeResponse(
            state=convert.STATES[runtime.residency],
            bytes=report.bytes,
            steps=report.steps,
            waited=convert.duration(report.waited_s),
            total=convert.duration(report.seconds),
        )

    @servicer_errors
    def Snapshot(
        self, request: worker_pb2.WorkerSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        runtime = self._runtime()
        reservation = Reservation(request.reserved_bytes or None)
        report = yield from _with_progress(
            lambda progress: runtime.snapshot(self.store, progress, reservation),
            lambda d, t: worker_pb2.WorkerSnapshotResponse(
                progress=common_pb2.TransferProgress(
                    tier=common_pb2.TIER_DISK, bytes_done=d, bytes_total=t
                )
            ),
        )
        manifest_ref = put_new(self.store, report.manifest.dumps().encode(), reservation)
        self.snapshot_id = manifest_ref.hash
        refs = [manifest_ref, *report.manifest.chunks]
        yield worker_pb2.WorkerSnapshotResponse(
            done=worker_pb2.WorkerSnapshotResponse.Done(
                snapshot_id=manifest_ref.hash,
                manifest_hash=manifest_ref.hash,
                bytes=report.manifest.weight_bytes,
                bytes_written=report.new_bytes,
                chunks=len(report.manifest.chunks),
                elapsed=convert.duration(report.seconds),
                fingerprint=report.manifest.fingerprint,
                chunk_refs=[worker_pb2.SnapshotChunk(hash=r.hash, size=r.size) for r in refs],
            )
        )

    # -- status and shutdown -----------------------------------------------------------------

    @servicer_errors
    def Status(self, request: worker_pb2.WorkerStatusRequest, context: grpc.ServicerContext) -> Any:
        return self._status()

    def _status(self) -> worker_pb2.WorkerStatusResponse:
        status = worker_pb2.WorkerStatusResponse(
            model=self.model,
            device=self.config.device,
            pid=os.getpid(),
            snapshot_id=self.snapshot_id,
            staging_bytes=staging_bytes(),  # read-only observability (tests/ledger)
        )
        runtime = self.runtime
        if runtime is None:
            status.state = (
                common_pb2.RUNTIME_STATE_LOADING
                if self._loading.locked()
                else common_pb2.RUNTIME_STATE_COLD
            )
            return status
        usage = runtime.memory()
        status.state = convert.STATES[runtime.residency]
        status.gpu_bytes, status.host_bytes, status.disk_bytes = (
            usage.gpu_bytes,
            usage.host_bytes,
            usage.disk_bytes,
        )
        status.active_requests = runtime.engine.num_running + runtime.engine.num_waiting
        status.peak_mapped_bytes = runtime.peak_mapped_bytes
        for name, arena in runtime.placement.arenas.items():
            status.arenas.add(
                name=name,
                base_address=arena.address,
                reserved_bytes=arena.nbytes,
                mapped_bytes=arena.nbytes if arena.is_mapped else 0,
            )
        return status

    @servicer_errors
    def Shutdown(
        self, request: worker_pb2.WorkerShutdownRequest, context: grpc.ServicerContext
    ) -> Any:
        if self.runtime is not None:
            self.runtime.close()
        self._on_shutdown()
        return worker_pb2.WorkerShutdownResponse()

    # -- helpers -----------------------------------------------------------------------------

    def _runtime(self) -> PagedRuntime:
        if self.runtime is None:
            raise FailedPrecondition(
                "this worker holds no runtime yet: Load first", reason="NOT_LOADED"
            )
        return self.runtime

    def _resident(self, verb: str) -> PagedRuntime:
        runtime = self._runtime()
        if runtime.residency is not PagedState.RESIDENT:
            raise FailedPrecondition(
                f"cannot {verb}: the runtime is {runtime.residency.value}; resume it first",
                reason="NOT_RESIDENT",
                metadata={"state": runtime.residency.value},
            )
        return runtime


def _check_load(request: worker_pb2.WorkerLoadRequest, target: PagedState) -> None:
    """InvalidArgument unless the request names a source with its field, and a target that
    keeps the host copy it needs."""
    if request.source == common_pb2.TIER_DISK:
        if not request.snapshot_id:
            raise InvalidArgument(
                "a Load from TIER_DISK needs snapshot_id", reason="NOTHING_TO_LOAD"
            )
    elif request.source == common_pb2.TIER_SOURCE:
        if not request.model_dir:
            raise InvalidArgument(
                "a Load from TIER_SOURCE needs model_dir", reason="NOTHING_TO_LOAD"
            )
    else:
        name = convert.tier_name(request.source)
        raise InvalidArgument(
            f"a Load's source is TIER_SOURCE (model_dir) or TIER_DISK (snapshot_id), not {name}",
            reason="BAD_LOAD_SOURCE",
            metadata={"source": name},
        )
    if target is PagedState.SUSPENDED_HOST and not request.keep_host_copy:
        raise InvalidArgument(
            "a Load to RUNTIME_STATE_SUSPENDED_HOST keeps its host copy: that is where the "
            "weights go",
            reason="BAD_TARGET",
        )
    if request.chat_template:
        chat_template.check_source(request.chat_template)


def _with_progress(
    work: Callable[[Emit], T], message: Callable[..., Any]
) -> Generator[Any, None, T]:
    """Run `work(emit)` on a thread (it may take seconds; the RPC streams meanwhile), yield
    `message(*args)` for every `emit(*args)`, and return its result (or raise its error)."""
    events: queue.Queue[Any] = queue.Queue()
    result: list[T] = []

    def run() -> None:
        try:
            result.append(work(lambda *args: events.put(args)))
            events.put(_DONE)
        except BaseException as exc:
            events.put(exc)

    threading.Thread(target=run, daemon=True).start()
    while (event := events.get()) is not _DONE:
        if isinstance(event, BaseException):
            raise event
        yield message(*event)
    return result[0]


def _token_logprobs(
    tokenizer: Tokenizer | None, delta: RequestDelta
) -> Iterator[common_pb2.TokenLogprobs]:
    """GenerateChunk.token_logprobs of one delta: each token with its bytes, and its top
    alternatives when the request asked for them (the engine then gives one per token)."""

    def one(token_id: int, logprob: float) -> common_pb2.TokenLogprob:
        data = tokenizer.token_bytes(token_id) if tokenizer is not None else b""
        return common_pb2.TokenLogprob(token_id=token_id, logprob=logprob, token_bytes=data)

    tops = delta.top_logprobs or ((),) * len(delta.token_ids)
    for token_id, logprob, top in zip(delta.token_ids, delta.logprobs, tops, strict=True):
        yield common_pb2.TokenLogprobs(
            chosen=one(token_id, logprob), top=[one(t, lp) for t, lp in top]
        )
