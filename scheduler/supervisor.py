"""Worker supervision: one `torpor-worker` process per runtime, started, watched and stopped.

A worker that exits is noticed at once: children through `wait()`, workers adopted from an
earlier torpord through a pidfd (which is readable the moment the process ends). Each worker
leaves a small record in `<runtime_dir>/workers/` so that a restarted torpord can find it
again and either adopt it (it still answers) or stop it. The record names the process for
good (pid, boot and start time: scheduler/procinfo.py), and a record whose pid is now some
other process (not this worker module on this socket, or started at another time) is
dropped without a signal: a reused pid is never killed (issue 12).

A worker on a GPU is given the socket of that GPU's keeper (`Keepers`, started with the GPU's
first worker), and the keepers are stopped after the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from torpor.errors import FailedPrecondition, ResourceExhausted, Unavailable
from torpor.log import get_logger
from torpor.scheduler import procinfo
from torpor.scheduler.procinfo import ProcessStart
from torpor.scheduler.server import remove_stale_socket
from torpor.v1 import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from torpor.scheduler.keepers import Keepers

log = get_logger("supervisor")

WORKER_MODULE = "torpor.worker.main"

OnExit = Callable[["WorkerProcess"], Awaitable[None]]


@dataclass(frozen=True)
class WorkerSpec:
    """How to start the worker of one runtime."""

    runtime_id: str
    model: str
    device: str  # cpu, cuda:N
    socket: Path
    store: Path
    handle_size: str = "512MiB"
    graph_pool: str = "512MiB"
    log_level: str = "info"
    python: str = sys.executable
    keeper: Path | None = None  # the Unix socket of its GPU's keeper

    def argv(self) -> list[str]:
        keeper = ["--keeper", str(self.keeper)] if self.keeper is not None else []
        return [
            self.python,
            "-m",
            WORKER_MODULE,
            "--socket",
            str(self.socket),
            "--device",
            self.device,
            "--store",
            str(self.store),
            "--handle-size",
            self.handle_size,
            "--graph-pool",
            self.graph_pool,
            "--log-level",
            self.log_level,
            *keeper,
        ]


class WorkerProcess:
    """A running worker and its gRPC stub."""

    def __init__(
        self,
        spec: WorkerSpec,
        pid: int,
        proc: asyncio.subprocess.Process | None,
        start: ProcessStart | None = None,
        pidfd: int | None = None,
    ) -> None:
        self.spec = spec
        self.pid = pid
        self.start = start  # with the pid, names this process for a restarted torpord
        self._proc = proc
        # An adopted worker (not our child) is watched and signalled through a pidfd, which
        # names this very process: once it has exited, its pid may belong to another one.
        self._pidfd = pidfd
        self.channel = grpc.aio.insecure_channel(f"unix://{spec.socket}")
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self.stopping = False  # an exit we asked for is not a crash

    @property
    def runtime_id(self) -> str:
        return self.spec.runtime_id

    async def wait_ready(self, within_s: float) -> None:
        """Until the worker's socket answers; Unavailable if it exits or takes too long."""
        ready = asyncio.ensure_future(self.channel.channel_ready())
        exited = asyncio.ensure_future(self.exited.wait())
        done, _ = await asyncio.wait(
            {ready, exited}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
        )
        for task in (ready, exited):
            task.cancel()
        # Closing the channel when the process exits also ends channel_ready(): an exit wins.
        answered = ready in done and not ready.cancelled() and ready.exception() is None
        if self.exited.is_set() or not answered:
            why = (
                f"exited with status {self.returncode}"
                if self.exited.is_set()
                else f"did not answer in {within_s:.0f} s"
            )
            raise Unavailable(
                f"worker for {self.spec.model} {why}",
                reason="WORKER_START_FAILED",
                metadata={"runtime": self.runtime_id, "pid": self.pid},
            )

    async def watch(self, on_exit: OnExit) -> None:
        """Wait for the process to end, then report it once."""
        if self._proc is not None:
            self.returncode = await self._proc.wait()
        elif self._pidfd is not None:
            await _wait_fd(self._pidfd)  # not our child: its status is not ours to know
            fd, self._pidfd = self._pidfd, None
            os.close(fd)
        else:
            self.returncode = await _wait_pidfd(self.pid)
        self.exited.set()
        await self.channel.close()
        await on_exit(self)

    async def stop(self, grace_s: float) -> None:
        """Ask it to shut down; SIGTERM, then SIGKILL, if it does not."""
        self.stopping = True
        if self.exited.is_set():
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
            await self.stub.Shutdown(worker_pb2.WorkerShutdownRequest(), timeout=grace_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                await asyncio.wait_for(self.exited.wait(), grace_s)
                return
            except TimeoutError:
                self.signal(sig)
        await self.exited.wait()

    def signal(self, sig: int) -> None:
        if self.exited.is_set():  # its pid may be another process's by now
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)


class Supervisor:
    """Starts, watches, adopts and stops the worker processes of one torpord."""

    def __init__(
        self,
        runtime_dir: Path,
        on_exit: OnExit,
        start_timeout: float = 60.0,
        keepers: Keepers | None = None,
    ) -> None:
        self.records = runtime_dir / "workers"
        self.records.mkdir(parents=True, exist_ok=True)
        self.on_exit = on_exit
        self.start_timeout = start_timeout
        self.keepers = keepers
        self.workers: dict[str, WorkerProcess] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    async def spawn(self, spec: WorkerSpec) -> WorkerProcess:
        if spec.keeper is None and self.keepers is not None:
            # Started with the device's first worker, or again if it died; None without one.
            keeper = await self.keepers.ensure(spec.device, spec.python)
            spec = replace(spec, keeper=keeper)
        spec.socket.unlink(missing_ok=True)
        proc = await asyncio.create_subprocess_exec(*spec.argv(), stdin=asyncio.subprocess.DEVNULL)
        # Read now, while it is our unreaped child: its pid cannot have been reused yet.
        worker = WorkerProcess(spec, proc.pid, proc, procinfo.started(proc.pid))
        # Watched before anything else can fail: `stop` waits for the watcher to see the
        # exit, so a worker whose record could not be written is still stopped (issue 12).
        self._watch(worker)
        try:
            self._record(worker)
            await worker.wait_ready(self.start_timeout)
        except BaseException:
            await worker.stop(grace_s=5)
            raise
        log.info(
            "worker_started",
            runtime=spec.runtime_id,
            model=spec.model,
            pid=proc.pid,
            device=spec.device,
            keeper=str(spec.keeper) if spec.keeper is not None else None,
        )
        return worker

    def _track(self, worker: WorkerProcess) -> None:
        self._watch(worker)
        try:
            self._record(worker)
        except (ResourceExhausted, Unavailable) as err:
            # An adopted worker runs already; without a record only a later restart loses it.
            log.error("worker_record_failed", runtime=worker.runtime_id, error=str(err))

    def _watch(self, worker: WorkerProcess) -> None:
        self.workers[worker.runtime_id] = worker
        task = asyncio.create_task(worker.watch(self._exited), name=f"watch-{worker.runtime_id}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _exited(self, worker: WorkerProcess) -> None:
        # The runtime's next worker may be running already (`stop` returns once the exit is
        # seen, before this report): its entry, record and socket are not this one's.
        if self.workers.get(worker.runtime_id, worker) is worker:
            self.workers.pop(worker.runtime_id, None)
            (self.records / f"{worker.runtime_id}.json").unlink(missing_ok=True)
            # A killed worker cannot remove its socket; left, it lingered until its runtime
            # started again (issue 12). Only a socket that nothing answers on is removed.
            with contextlib.suppress(FailedPrecondition, OSError):
                remove_stale_socket(worker.spec.socket)
        level = "info" if worker.stopping else "error"
        getattr(log, level)(
            "worker_exited",
            runtime=worker.runtime_id,
            model=worker.spec.model,
            pid=worker.pid,
            returncode=worker.returncode,
            expected=worker.stopping,
        )
        await self.on_exit(worker)

    def _record(self, worker: WorkerProcess) -> None:
        """Write the worker's record (atomically); a full or failing runtime directory
        raises ResourceExhausted (RUNTIME_DIR_FULL) or Unavailable (RUNTIME_DIR_IO_ERROR)
        and leaves no partial file."""
        fields = {k: str(v) for k, v in asdict(worker.spec).items() if v is not None}
        start = asdict(worker.start) if worker.start is not None else {}
        record = {"pid": worker.pid, **{f"start_{k}": v for k, v in start.items()}, **fields}
        path = self.records / f"{worker.runtime_id}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _record_error(exc, path, worker.spec.model) from exc

    async def adopt(self) -> list[WorkerProcess]:
        """Find the workers an earlier torpord left: adopt those that answer, stop the rest.
        Only a process that is that worker is signalled; a record whose pid is now another
        process is dropped."""
        adopted = []
        for path in sorted(self.records.glob("*.json")):
            try:
                record = WorkerRecord.parse(path.read_text())
            except (OSError, ValueError, TypeError, KeyError):
                path.unlink(missing_ok=True)
                continue
            worker = await self._try_adopt(record.spec, record.pid, record.start)
            if worker is None:
                path.unlink(missing_ok=True)
            else:
                adopted.append(worker)
        return adopted

    async def _try_adopt(
        self, spec: WorkerSpec, pid: int, start: ProcessStart | None
    ) -> WorkerProcess | None:
        try:  # a pidfd holds on to this very process: a signal never reaches a reused pid
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        why = procinfo.not_ours(pid, WORKER_MODULE, spec.socket, start)
        if why:
            os.close(pidfd)
            log.warning("stale_worker_record", runtime=spec.runtime_id, pid=pid, why=why)
            return None
        worker = WorkerProcess(spec, pid, None, start or procinfo.started(pid), pidfd)
        try:
            await asyncio.wait_for(worker.channel.channel_ready(), 5)
            await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=5)
        except (TimeoutError, grpc.aio.AioRpcError):
            log.warning("worker_unresponsive_stopped", runtime=spec.runtime_id, pid=pid)
            worker.signal(signal.SIGKILL)
            await worker.channel.close()
            os.close(pidfd)
            return None
        except BaseException:
            os.close(pidfd)
            raise
        self._track(worker)  # its watcher closes the pidfd once the worker has exited
        log.info("worker_adopted", runtime=spec.runtime_id, model=spec.model, pid=pid)
        return worker

    async def stop_all(self, grace_s: float) -> None:
        """Stop every worker, then the keepers (none is started after this)."""
        workers = list(self.workers.values())
        await asyncio.gather(*(w.stop(grace_s) for w in workers), return_exceptions=True)
        if self._watchers:
            await asyncio.wait(self._watchers, timeout=grace_s)
        if self.keepers is not None:
            await self.keepers.stop(grace_s)


def _record_error(exc: OSError, path: Path, model: str) -> ResourceExhausted | Unavailable:
    meta = {"path": path, "errno": exc.errno, "model": model}
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(
            f"cannot start a worker for {model}: the runtime directory is full "
            f"(writing {path}: {exc.strerror})",
            reason="RUNTIME_DIR_FULL",
            metadata=meta,
        )
    return Unavailable(
        f"cannot start a worker for {model}: writing {path} failed: {exc.strerror}",
        reason="RUNTIME_DIR_IO_ERROR",
        metadata=meta,
    )


@dataclass(frozen=True)
class WorkerRecord:
    """A worker record as `Supervisor._record` writes it: the spec, the pid, and when that
    process started (None in a record of a torpord from before issue 12)."""

    spec: WorkerSpec
    pid: int
    start: ProcessStart | None

    @classmethod
    def parse(cls, text: str) -> WorkerRecord:
        record = json.loads(text)
        pid = int(record.pop("pid"))
        boot, ticks = record.pop("start_boot_id", None), record.pop("start_ticks", None)
        start = None if boot is None or ticks is None else ProcessStart(str(boot), int(ticks))
        paths = {k: Path(record[k]) for k in ("socket", "store", "keeper") if k in record}
        return cls(WorkerSpec(**{**record, **paths}), pid, start)


async def _wait_pidfd(pid: int) -> int | None:
    """Until `pid` (not our child) exits; its status is not ours to know (None)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        await _wait_fd(fd)
    finally:
        os.close(fd)
    return None


async def _wait_fd(fd: int) -> None:
    """Until the pidfd `fd` is readable: its process has exited."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
