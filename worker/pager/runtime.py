"""A paged runtime: an engine whose memory can leave the GPU and come back at the same
addresses, so its captured graphs, allocator layout and warmed kernels survive.

Levels of suspend (docs/ARCHITECTURE.md, "Tiers"):
- HOST: the weights' retained host copy (made once, in the background, right after load)
  already holds the bytes, so suspending only unmaps the weights, KV and graph arenas.
- DEEP: HOST, then the driver checkpoints what remains (the CUDA context), leaving zero GPU
  bytes. On the CPU backend DEEP behaves as HOST.
- DISK: the weights are in the chunk store (written once; reused), the host copy is released
  too. Resuming streams the chunks back, verified, through a ring of staging buffers.
Resuming maps every arena again, refills the weights, and zeroes the KV cache so nothing of
an earlier tenant can leak. A resume from DISK may stop at HOST instead (a prefetch): the
snapshot is read into a new host copy and no arena is mapped.

Whether the runtime keeps its host copy is torpord's decision (it counts the copy against its
host budget): a load or a resume is told, and a suspend to HOST of a runtime without one
makes it then, on the eviction path.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import torch

from torpor.checkpoint_files import CheckpointDir, as_checkpoint
from torpor.errors import FailedPrecondition
from torpor.exchange_board import Board, Side, Status
from torpor.log import get_logger
from torpor.store.chunks import ChunkStore
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.loop import EngineLoop
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.runtime import WeightFiller
from torpor.worker.pager import build, checkpoint, exchange, refill
from torpor.worker.pager.exchange import ExchangeReport, Inject
from torpor.worker.pager.host import HostBuffer, HostPinner
from torpor.worker.pager.host_copy import HostCopy
from torpor.worker.pager.keeper_client import KeeperClient
from torpor.worker.pager.manifest import SnapshotManifest, environment_here
from torpor.worker.pager.paged_state import (
    DEEPER,
    LEVEL_OF,
    SUSPENDED,
    MemoryUsage,
    PagedState,
    ResumeReport,
    SuspendLevel,
    SuspendReport,
    check_resume,
)
from torpor.worker.pager.placement import ArenaPlacement, PagerOptions
from torpor.worker.pager.snapshot import (
    Reservation,
    SnapshotReport,
    read_model_files,
    store_model_files,
    write_pieces,
)
from torpor.worker.pager.stream import DeviceDrainer, HostStager, StagingRing
from torpor.worker.progress import ByteProgress

log = get_logger("pager.runtime")


class PagedRuntime:
    """An engine in arenas, with suspend, resume and snapshot. Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        placement: ArenaPlacement,
        options: PagerOptions,
        model_dir: CheckpointDir,
    ) -> None:
        self.engine = engine
        self.placement = placement
        self.options = options
        self.model_dir = model_dir
        self.model_files = read_model_files(model_dir)  # what a snapshot will store
        self.loop = EngineLoop(engine).start()
        self.residency = PagedState.RESIDENT
        self.manifest: SnapshotManifest | None = None
        keeper = KeeperClient(Path(options.keeper_socket)) if options.keeper_socket else None
        self.host_copy = HostCopy(lambda: self.loop.busy(), keeper)
        self._lock = threading.RLock()
        self._pause: contextlib.ExitStack | None = None
        self._store: ChunkStore | None = None  # where the snapshot lives, for disk resumes
        self.refill = refill.Refill(engine, placement, options, self.host_copy)
        self.environment = environment_here(engine.device)
        # The most arena bytes mapped at once during the last load, suspend or resume.
        self.peak_mapped_bytes = placement.mapped_bytes()
        # Deep suspend's controller, started now so its start-up (seconds) is never paid on
        # the eviction path.
        self._controller = (
            checkpoint.CheckpointController(os.getpid()).start()
            if engine.device.type == "cuda"
            else None
        )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_dir: Path | CheckpointDir,
        engine_options: EngineOptions,
        options: PagerOptions,
        progress: ByteProgress | None = None,
        filler: WeightFiller | None = None,
    ) -> PagedRuntime:
        """Cold load from a Hugging Face checkpoint into arenas (`filler`: another source of
        the weight bytes, e.g. random ones for a benchmark; the directory's safetensors by
        default). With `options.host_copy`, the host copy is then made in the background."""
        engine, placement = build.load_engine(model_dir, engine_options, options, progress, filler)
        runtime = cls(engine, placement, options, as_checkpoint(model_dir))
        if options.host_copy:
            runtime._start_host_copy()
        return runtime

    @classmethod
    def restore(
        cls,
        manifest: SnapshotManifest,
        store: ChunkStore,
        workdir: Path,
        options: PagerOptions,
        progress: ByteProgress | None = None,
    ) -> PagedRuntime:
        """Build the runtime in this (new) process from a snapshot: arenas at the recorded
        addresses when they are free, weights streamed from disk and verified, graphs
        captured again. The source checkpoint is not read."""
        engine, placement, model_dir = build.restore_engine(
            manifest, store, workdir, options, progress
        )
        runtime = cls(engine, placement, options, as_checkpoint(model_dir))
        runtime.manifest = manifest
        runtime._store = store
        if options.host_copy:
            runtime._start_host_copy()
        return runtime

    # -- the host copy -----------------------------------------------------------------------

    @property
    def host(self) -> HostBuffer | None:
        """The weights' retained host copy, once made."""
        return self.host_copy.buffer

    def _start_host_copy(self) -> None:
        self.host_copy.start(self.placement.arenas["weights"], self.engine.memory.weights.nbytes)

    def wait_host_copy(self) -> HostBuffer | None:
        """The host copy, once it is made (None when the runtime keeps none)."""
        return self.host_copy.wait()

    # -- snapshot ----------------------------------------------------------------------------

    def snapshot(
        self,
        store: ChunkStore,
        progress: ByteProgress | None = None,
        reservation: Reservation | None = None,
    ) -> SnapshotReport:
        """Write the weights (once) and the model files to the chunk store, within
        `reservation` (torpord's, made before any chunk is written)."""
        reservation = reservation or Reservation()
        with self._lock:
            self._require(
                PagedState.RESIDENT,
                PagedState.SUSPENDED_HOST,
                PagedState.SUSPENDED_DEEP,
                verb="snapshot",
            )
            start = time.perf_counter()
            layout = self.engine.memory.weights
            host = self.wait_host_copy()
            source = host.tensor if host is not None else self.placement.regions["weights"]
            if host is None and self.residency is not PagedState.RESIDENT:
                raise FailedPrecondition(
                    "no weight bytes to snapshot", reason="NOTHING_TO_SNAPSHOT"
                )
            total = layout.nbytes
            pieces, new = write_pieces(
                source,
                layout,
                store,
                self._pinner(),
                None if progress is None else lambda d: progress(d, total),
                reservation,
                self.options.staging_limit,
            )
            options = self.engine.options
            self.manifest = SnapshotManifest(
                environment=self.environment,
                dtype=self.engine.memory.dtype,
                max_batch=options.max_batch,
                max_seq_len=options.max_seq_len,
                weights=layout.to_json(),
                kv=self.engine.memory.kv.to_json(),
                addresses=self.placement.arena_addresses(),
                files=store_model_files(self.model_files, store, reservation),
                pieces=pieces,
                model=self.engine.cfg.to_json(),
            )
            report = SnapshotReport(self.manifest, new, time.perf_counter() - start)
            log.info(
                "snapshot_written",
                bytes=self.manifest.weight_bytes,
                new_bytes=new,
                seconds=round(report.seconds, 3),
            )
            return report

    # -- suspend and resume ------------------------------------------------------------------

    def suspend(
        self, level: SuspendLevel, *, abort: bool = False, store: ChunkStore | None = None
    ) -> SuspendReport:
        """Release the runtime's memory down to `level`. With requests running this fails
        (FailedPrecondition RUNTIME_BUSY) unless `abort`, which ends them first. A suspended
        runtime can be moved further down (HOST to DEEP or DISK, DEEP to DISK)."""
        with self._lock:
            if self.residency in DEEPER and level in DEEPER[self.residency]:
                return self._deepen(level, store)
            self._require(PagedState.RESIDENT, verb="suspend")
            self.peak_mapped_bytes = self.placement.mapped_bytes()
            start = time.perf_counter()
            clock = refill.Stopwatch()
            self.host_copy.stop_repin()
            engine = self._park()
            aborted = 0
            if engine.has_work():
                if not abort:
                    self._unpark()
                    raise FailedPrecondition(
                        f"the runtime is serving {len(engine.request_ids())} requests; drain "
                        "them first or suspend with abort",
                        reason="RUNTIME_BUSY",
                    )
                aborted = self.loop.abort_parked()
            try:
                self._prepare_level(level, store)
            except BaseException:
                self._unpark()
                raise
            clock.lap("park")
            if level is SuspendLevel.DISK:
                self.host_copy.cancel()  # a copy still being made would only be thrown away
            released = self._unmap_all(clock)
            if level is SuspendLevel.DISK:
                self.host_copy.release()
            if level is SuspendLevel.DEEP:
                self._checkpoint_deep()
                clock.lap("checkpoint")
            self.residency = SUSPENDED[level]
            seconds = time.perf_counter() - start
            report = SuspendReport(level, seconds, released, aborted, clock.laps)
            log.info(
                "suspended",
                level=level.value,
                seconds=round(report.seconds, 4),
                gpu_bytes_released=released,
                **{f"{k}_s": round(v, 4) for k, v in report.phases.items()},
            )
            return report

    def _deepen(self, level: SuspendLevel, store: ChunkStore | None) -> SuspendReport:
        """Move an already suspended runtime further down; its arenas stay unmapped."""
        self.peak_mapped_bytes = 0
        start = time.perf_counter()
        if self.residency is PagedState.SUSPENDED_DEEP:
            self._checkpoint("resume")  # DISK keeps the context
        if level is SuspendLevel.DISK:
            self._ensure_snapshot(store)
            self.host_copy.release()
        elif level is SuspendLevel.DEEP:
            self._checkpoint_deep()
        self.residency = SUSPENDED[level]
        report = SuspendReport(level, time.perf_counter() - start, 0, 0)
        log.info("suspended_further", level=level.value, seconds=round(report.seconds, 4))
        return report

    def _checkpoint_deep(self) -> None:
        """Unlock the host copy's pages, then checkpoint what remains on the device. The
        driver's checkpoint and restore each cost about 25 ms per page-locked GB (a 72 GB
        copy: 1.8 to 2.3 s each way, measured on an H200); unlocked, the copy comes back
        through staging buffers and is locked again in the background after the resume."""
        self.refill.prepare_deep(self._pinner())
        self.host_copy.unpin()
        self._checkpoint("suspend")

    def _ensure_snapshot(self, store: ChunkStore | None) -> None:
        """The weights on disk before a disk-level suspend: written once, then reused."""
        if self.manifest is None:
            if store is None:
                raise FailedPrecondition(
                    "a disk suspend needs a snapshot or a chunk store", reason="NO_SNAPSHOT"
                )
            self.snapshot(store)
        self._store = store or self._store

    def _prepare_level(self, level: SuspendLevel, store: ChunkStore | None) -> None:
        if level is SuspendLevel.DISK:
            self._ensure_snapshot(store)
        elif self.wait_host_copy() is None:
            # It kept no copy (torpord asked for none): pin and copy now, on the eviction
            # path, before anything is unmapped. torpord prices this time (POLICY.md).
            self.host_copy.make(self.placement.arenas["weights"], self.engine.memory.weights.nbytes)

    def _unmap_all(self, clock: refill.Stopwatch | None = None) -> int:
        # The background host copy reads the weights arena: never unmap under it (a disk
        # suspend right after a disk resume would otherwise race the copy it restarted).
        self.host_copy.settle()
        if self._cuda:
            torch.cuda.synchronize(self.engine.device)  # a streamed resume's copies too
        self.refill.forget()
        released = self.placement.mapped_bytes()
        for arena in self.placement.arenas.values():
            arena.unmap()
        if clock is not None:
            clock.lap("unmap")
        if self._cuda:
            refill.release_cached_device_memory()
        if clock is not None:
            clock.lap("cache")
        return released if self._cuda else 0

    def resume(
        self,
        store: ChunkStore | None = None,
        progress: ByteProgress | None = None,
        *,
        source: PagedState | None = None,
        target: PagedState = PagedState.RESIDENT,
        keep_host_copy: bool = True,
    ) -> ResumeReport:
        """Bring the runtime back: same addresses, weights refilled, KV zeroed. `source`, when
        given, must be where it is (FailedPrecondition otherwise: the caller's view is
        stale). `target` SUSPENDED_HOST (from disk only) reads the snapshot into a new host
        copy and maps nothing. Without `keep_host_copy`, no host copy is left afterwards:
        none is made after a disk resume, and one it resumed from is released."""
        with self._lock:
            self._require(
                PagedState.SUSPENDED_HOST,
                PagedState.SUSPENDED_DEEP,
                PagedState.SUSPENDED_DISK,
                verb="resume",
            )
            check_resume(self.residency, source, target, keep_host_copy)
            if target is PagedState.SUSPENDED_HOST:
                return self._disk_to_host(store, progress)
            self.peak_mapped_bytes = self.placement.mapped_bytes()
            start = time.perf_counter()
            clock = refill.Stopwatch()
            self.host_copy.stop_repin()
            tier = LEVEL_OF[self.residency].value
            if self.residency is PagedState.SUSPENDED_DEEP:
                self._checkpoint("resume")
                clock.lap("restore")
                # The context is back: if what follows fails, the runtime stays suspended
                # at the host level, not checkpointed.
                self.residency = PagedState.SUSPENDED_HOST
            came_from_disk = self.residency is PagedState.SUSPENDED_DISK
            # A copy about to be released is not streamed from: it must be done with first.
            streamed = keep_host_copy and self.refill.can_stream(came_from_disk)
            try:
                moved = self._bring_back(streamed, store, progress, clock)
            except BaseException:
                self._unmap_mapped()  # never serve from a half-filled or unverified arena
                raise
            self.residency = PagedState.RESIDENT
            self._unpark()
            if not keep_host_copy:
                self.host_copy.release()  # torpord counts no copy from now on
            elif came_from_disk:
                self._start_host_copy()
            else:
                self.host_copy.repin()  # after a deep suspend: lock it again, giving way
                self.host_copy.keep()  # the keeper was lost: hand the copy over again
            via = self.refill.via
            report = ResumeReport(
                tier, time.perf_counter() - start, moved, clock.laps, streamed, via
            )
            if streamed and progress is not None:
                progress(moved, moved)
            log.info(
                "resumed",
                tier=tier,
                seconds=round(report.seconds, 4),
                via=via,
                gbps=None if streamed else round(report.gbps, 2),
                **{f"{k}_s": round(v, 4) for k, v in report.phases.items()},
            )
            return report

    # -- exchange swap -------------------------------------------------------------------------

    def exchange(
        self, side: Side, board: Board, timeout_s: float, inject: Inject | None = None
    ) -> ExchangeReport:
        """One side of an exchange swap (exchange.py): OUT takes a RESIDENT runtime to
        SUSPENDED_HOST, IN a SUSPENDED_HOST one to RESIDENT, each taking only what the other
        side of `board` gives back. A side that fails (or whose peer fails) leaves the
        runtime EXCHANGING and raises; the same verb with the other side brings it back
        whole. A runtime already where its side ends (OUT: SUSPENDED_HOST, IN: RESIDENT: the
        rollback of a side that never moved) has nothing to do. A RESIDENT runtime must be
        idle (RUNTIME_BUSY otherwise)."""
        with self._lock:
            start = time.perf_counter()
            done = PagedState.SUSPENDED_HOST if side is Side.OUT else PagedState.RESIDENT
            if self.residency is done:  # there already (a rollback of a side that never moved)
                board.finish(side, Status.DONE)
                return ExchangeReport(side, 0.0, 0, 0, 0.0)
            stage = None
            try:
                if self.residency is not PagedState.EXCHANGING:
                    self._require(
                        PagedState.RESIDENT if side is Side.OUT else PagedState.SUSPENDED_HOST,
                        verb=f"exchange {side.value}",
                    )
                stage = self._exchange_stage(side)
                mover = exchange.Mover(
                    self.placement.arenas["weights"],
                    self._exchange_buffer(),
                    self.engine.memory.weights.nbytes,
                    board,
                    time.monotonic() + timeout_s,
                    inject,
                    stage,
                )
                if side is Side.OUT:
                    self._scratch_out(board)
                    mover.out()
                else:
                    mover.into()
                    self._scratch_in(board, mover.deadline)
            except BaseException as exc:
                board.finish(side, Status.FAILED)
                log.error("exchange_failed", side=side.value, error=repr(exc))
                raise
            finally:
                if stage is not None:
                    stage.close()
            board.finish(side, Status.DONE)
            if side is Side.OUT:
                self.residency = PagedState.SUSPENDED_HOST
                if self._cuda:
                    refill.release_cached_device_memory()
                self.host_copy.repin()  # its new pages were not locked as they were taken
                self.host_copy.keep()
            else:
                self.host_copy.release()  # every page went to the device
                self.residency = PagedState.RESIDENT
                self._unpark()
            tally = mover.tally
            report = ExchangeReport(
                side, time.perf_counter() - start, tally.moved, tally.steps, tally.waited
            )
            log.info(
                "exchanged",
                side=side.value,
                seconds=round(report.seconds, 4),
                bytes=report.bytes,
                gbps=round(report.gbps, 2),
                waited_s=round(report.waited_s, 4),
            )
            return report

    def _exchange_stage(self, side: Side) -> HostStager | DeviceDrainer | None:
        """Where host memory is page-locked (CUDA): the staging buffers through which this
        side copies unlocked host memory (exchange.py), within the staging limit."""
        pinner = self._pinner()
        if pinner is None:
            return None
        threads = self.options.stage_threads
        piece = min(refill.STAGE_BYTES, self.engine.memory.weights.nbytes)
        ring = StagingRing.within(self.options.staging_limit, threads + 2, piece, pinner)
        return DeviceDrainer(threads, ring) if side is Side.OUT else HostStager(threads, ring)

    def _exchange_buffer(self) -> HostBuffer:
        """Get the runtime ready for its side of an exchange; the host copy it fills or
        empties. OUT from RESIDENT parks the engine and releases the KV arena and graph pool
        (the other side's room); IN from SUSPENDED_HOST has the keeper let go of the copy,
        whose pages it will free."""
        if self.residency is PagedState.RESIDENT:
            self.host_copy.stop_repin()
            engine = self._park()
            if engine.has_work():
                self._unpark()
                raise FailedPrecondition(
                    f"the runtime is serving {len(engine.request_ids())} requests; an "
                    "exchange takes an idle runtime",
                    reason="RUNTIME_BUSY",
                )
            self.host_copy.settle()
            if self._cuda:
                torch.cuda.synchronize(self.engine.device)
            self.refill.forget()
            self.residency = PagedState.EXCHANGING
        elif self.residency is PagedState.SUSPENDED_HOST:
            self.host_copy.stop_repin()
            self.host_copy.wait()
            self.host_copy.unkeep()
            self.residency = PagedState.EXCHANGING
        buffer = self.host_copy.buffer
        if buffer is None:
            buffer = HostBuffer(
                self.engine.memory.weights.nbytes,
                pinner=self._pinner(),
                shared=self.host_copy.keeper is not None,
                lazy=True,
            )
            self.host_copy.partial(buffer)
        return buffer

    def _scratch_out(self, board: Board) -> None:
        """Release the KV arena and graph pool (an outgoing runtime's first room for the
        other side)."""
        for name, arena in self.placement.arenas.items():
            if name != "weights" and arena.mapped_bytes:
                released = arena.mapped_bytes
                arena.unmap()
                board.add("out_gpu_freed", released)

    def _scratch_in(self, board: Board, deadline: float) -> None:
        """The KV arena (zeroed) and graph pool of an incoming runtime, once there is room."""
        arenas = [a for n, a in self.placement.arenas.items() if n != "weights"]
        for arena in arenas:
            if arena.is_mapped:
                continue
            board.wait_room(Side.IN, arena.nbytes, deadline)
            arena.map(zero=arena.name == "kv")
            board.add("in_gpu_taken", arena.nbytes)
        self._note_mapped()
        if self._cuda:
            torch.cuda.synchronize(self.engine.device)

    def _disk_to_host(
        self, store: ChunkStore | None, progress: ByteProgress | None
    ) -> ResumeReport:
        """From SUSPENDED_DISK to SUSPENDED_HOST: the snapshot's chunks, verified, straight
        into a new host copy. No arena is mapped, so the device holds what it held on disk
        (the context); a later host resume streams from the copy."""
        self.peak_mapped_bytes = self.placement.mapped_bytes()  # 0: suspended
        start = time.perf_counter()
        clock = refill.Stopwatch()
        buffer = refill.snapshot_to_host(
            self.manifest,
            store or self._store,
            self.placement.arenas["weights"],
            self.engine.memory.weights.nbytes,
            self.options,
            self.host_copy.keeper is not None,
            progress,
        )
        clock.lap("refill")
        self.host_copy.adopt(buffer)
        self.residency = PagedState.SUSPENDED_HOST
        report = ResumeReport(
            SuspendLevel.DISK.value,
            time.perf_counter() - start,
            buffer.nbytes,
            clock.laps,
            via="disk",
        )
        log.info(
            "resumed_to_host",
            tier=report.tier,
            seconds=round(report.seconds, 4),
            gbps=round(report.gbps, 2),
        )
        return report

    def _note_mapped(self) -> None:
        self.peak_mapped_bytes = max(self.peak_mapped_bytes, self.placement.mapped_bytes())

    def _bring_back(
        self,
        streamed: bool,
        store: ChunkStore | None,
        progress: ByteProgress | None,
        clock: refill.Stopwatch,
    ) -> int:
        """Map every arena and refill the weights; the bytes moved."""
        weights = self.placement.arenas["weights"]
        weights.map()
        self._note_mapped()
        clock.lap("map")
        if streamed:  # serve at once; each layer waits for its own bytes
            self._map_scratch()
            clock.lap("finish")
            moved = self.refill.stream()
            clock.lap("refill_enqueued")
            return moved
        if self.residency is PagedState.SUSPENDED_DISK:
            moved = self.refill.from_snapshot(
                self.manifest, store or self._store, self._pinner(), progress
            )
        else:
            moved = self.refill.from_host(progress)
        clock.lap("refill")
        self._map_scratch()
        clock.lap("finish")
        return moved

    def _unmap_mapped(self) -> None:
        """After a failed resume: release whatever was mapped again; errors of this cleanup
        are logged, the original one is what the caller sees."""
        try:
            if self._cuda:
                torch.cuda.synchronize(self.engine.device)
            self.refill.forget()
            for arena in self.placement.arenas.values():
                if arena.is_mapped:
                    arena.unmap()
        except Exception as exc:  # reported; the resume's own error is what is raised
            log.error("resume_cleanup_failed", error=repr(exc))

    def _map_scratch(self) -> None:
        """Map the KV arena (zeroed: nothing of an earlier tenant may leak) and the graph pool."""
        arenas = self.placement.arenas
        arenas["kv"].map(zero=True)
        if "graphs" in arenas:
            arenas["graphs"].map()
        self._note_mapped()
        if self._cuda:
            torch.cuda.synchronize(self.engine.device)

    def wait_weights(self) -> float | None:
        """Block until the last resume's weights are all in; return how long their copy took
        on the device (None unless that resume was streamed)."""
        return self.refill.wait()

    # -- what it holds -----------------------------------------------------------------------

    def memory(self) -> MemoryUsage:
        arena_bytes = self.placement.mapped_bytes()
        host = self.host_copy.nbytes
        disk = self.manifest.weight_bytes if self.manifest is not None else 0
        return MemoryUsage(arena_bytes if self._cuda else 0, arena_bytes, host, disk)

    def close(self) -> None:
        """Stop the engine and release every arena and the host copy. Idempotent."""
        with self._lock:
            if self.residency is PagedState.CLOSED:
                return
            if self.residency is PagedState.SUSPENDED_DEEP:
                self._checkpoint("resume")  # a checkpointed process's CUDA calls would block
            if self._controller is not None:
                self._controller.close()
            self.host_copy.cancel()
            self.host_copy.settle(timeout=60)
            self.loop.shutdown()
            if self._pause is not None:
                self._pause.close()
                self._pause = None
            self.host_copy.release()
            if self.host_copy.keeper is not None:
                self.host_copy.keeper.close()  # the keeper lets go of all it held for us
            self.refill.close()
            self.placement.close()
            self.residency = PagedState.CLOSED

    # -- helpers -----------------------------------------------------------------------------

    def _checkpoint(self, action: str) -> None:
        """Deep suspend's driver checkpoint, or its restore; nothing on the CPU backend, where
        DEEP behaves as HOST."""
        if self._cuda:
            checkpoint.run_controller(action, os.getpid(), controller=self._controller)

    @property
    def _cuda(self) -> bool:
        return self.engine.device.type == "cuda"

    def _pinner(self) -> HostPinner | None:
        backend = self.placement.backend
        return backend if isinstance(backend, HostPinner) else None

    def _require(self, *states: PagedState, verb: str) -> None:
        if self.residency not in states:
            raise FailedPrecondition(
                f"cannot {verb} a runtime that is {self.residency.value}",
                reason="BAD_RUNTIME_STATE",
                metadata={"state": self.residency.value, "verb": verb},
            )

    def _park(self) -> Engine:
        """Pause the engine loop (nothing in flight) until `_unpark`."""
        stack = contextlib.ExitStack()
        engine = stack.enter_context(self.loop.paused())
        self._pause = stack
        return engine

    def _unpark(self) -> None:
        if self._pause is not None:
            self._pause.close()
            self._pause = None
