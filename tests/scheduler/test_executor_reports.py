"""Every transition the executor starts ends in exactly one report (docs/RELIABILITY.md, "Hangs and
wedged models"), whatever its worker does: a call that grpc cancels because the worker's channel
closed, a worker that never answers, a snapshot that fails its checks. The worker here is a stand-in
(a fake stub and a fake process); tests/daemon/test_faults_hangs.py kills real ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from torpor.errors import DataLoss, DeadlineExceeded, FailedPrecondition, Unavailable
from torpor.scheduler.core import (
    Footprint,
    Resume,
    RuntimeState,
    Suspend,
    Tier,
    TransitionCompleted,
    TransitionFailed,
)
from torpor.scheduler.executor import Executor, ModelSource, WorkerDefaults
from torpor.scheduler.recorder import WriteGate
from torpor.v1 import common_pb2, worker_pb2

RID = "m#1"


class StandInWorker:
    """A worker process that never runs: its stub methods are the test's, and `stop` records
    that the executor killed it."""

    def __init__(self, **methods: Callable[..., Any]) -> None:
        self.runtime_id = RID
        self.pid = 4242
        self.spec = SimpleNamespace(model="m")
        self.returncode: int | None = None
        self.stub = type("Stub", (), {k: staticmethod(v) for k, v in methods.items()})()
        self.stopped = 0
        self.killed = 0
        self.exited = asyncio.Event()
        self.stopping = False
        self.hang_on_stop = False

    async def stop(self, grace_s: float) -> None:
        self.stopped += 1
        self.stopping = True
        if self.hang_on_stop:  # a process that never goes away (stuck in the kernel)
            await asyncio.Event().wait()
        self.exited.set()

    def signal(self, sig: int) -> None:
        self.killed += 1
        if not self.hang_on_stop:
            self.exited.set()


class StandInSupervisor:
    def __init__(self, worker: StandInWorker | None) -> None:
        self.workers = {RID: worker} if worker is not None else {}


class Snapshots:
    """The recorder's side, in memory: one snapshot, which `forget` drops."""

    def __init__(self, others: int = 0) -> None:
        self.forgotten: list[str] = []
        self.others = others
        self.gate = WriteGate()
        self.sweeps = 0

    def sweep_soon(self) -> None:
        self.sweeps += 1

    def write_failed(self, model: str, runtime_id: str, error: Any) -> None:
        pass

    def snapshot_bytes(self, model: str) -> int:
        return 4096

    async def forget(self, model: str, error: Any) -> bool:
        self.forgotten.append(error.reason)
        self.others -= 1
        return self.others >= 0

    @contextlib.asynccontextmanager
    async def restoring(self, model: str) -> AsyncIterator[str]:
        yield "0" * 32

    @contextlib.asynccontextmanager
    async def writing(self, model: str, reserve_bytes: int) -> AsyncIterator[Any]:
        async with self.gate.writing():
            yield SimpleNamespace(reserved=reserve_bytes, commit=self._commit)

    async def _commit(self, written: Any) -> Any:
        return SimpleNamespace(total_bytes=sum(c.size for c in written.chunks))

    async def bandwidth(self, tier: Tier, nbytes: int, seconds: float) -> None:
        pass


SOURCE = ModelSource(Path("/m"), "float32", 1, 16, Footprint(weights=1, kv=1))


def worker_defaults(timeout_s: float, runtime_dir: Path = Path("/nonexistent")) -> WorkerDefaults:
    """What torpord's config gives the stand-in workers: short bounds, nothing on disk."""
    return WorkerDefaults(
        runtime_dir=runtime_dir,
        store=runtime_dir / "store",
        cuda=False,
        handle_size="2MiB",
        graph_pool="2MiB",
        python="python",
        log_level="info",
        stop_grace_s=0.05,
        transition_timeout_s=timeout_s,
    )


def executor(
    worker: StandInWorker | None, snapshots: Snapshots | None = None, timeout_s: float = 30.0
) -> tuple[Executor, list[Any]]:
    reports: list[Any] = []
    ex = Executor(
        StandInSupervisor(worker),  # type: ignore[arg-type]
        worker_defaults(timeout_s),
        {"m": SOURCE},
        reports.append,
        lambda *_: None,
        snapshots or Snapshots(),
    )
    return ex, reports


async def run(ex: Executor, action: Any) -> None:
    ex.start(action)
    await asyncio.wait_for(asyncio.gather(*ex._tasks, return_exceptions=True), 10)


SUSPEND = Suspend(RID, "m", 7, Tier.DISK, write_snapshot=True)
RESUME_DISK = Resume(RID, "m", 8, Tier.DISK, RuntimeState.RESIDENT, keep_host_copy=False)


def _channel_closed_stream(*_: Any, **__: Any) -> AsyncIterator[Any]:
    """What grpc does to a streaming call in flight when the worker's channel is closed
    (the supervisor closes it when the worker process exits): CancelledError."""

    async def gen() -> AsyncIterator[Any]:
        raise asyncio.CancelledError()
        yield  # pragma: no cover

    return gen()


async def _channel_closed_unary(*_: Any, **__: Any) -> Any:
    raise asyncio.CancelledError()


def test_stand_in_worker_whose_channel_closes_mid_snapshot_is_reported_failed() -> None:
    worker = StandInWorker(Snapshot=_channel_closed_stream, Suspend=_channel_closed_unary)
    ex, reports = executor(worker)
    asyncio.run(run(ex, SUSPEND))
    assert [type(r) for r in reports] == [TransitionFailed]
    failed = reports[0]
    assert failed.seq == 7 and isinstance(failed.error, Unavailable)
    assert failed.error.reason == "WORKER_DIED"
    assert RID not in ex.busy


def test_stand_in_worker_whose_channel_closes_mid_suspend_is_reported_failed() -> None:
    worker = StandInWorker(Suspend=_channel_closed_unary)
    ex, reports = executor(worker)
    asyncio.run(run(ex, Suspend(RID, "m", 3, Tier.HOST, write_snapshot=False)))
    assert [type(r) for r in reports] == [TransitionFailed]
    assert worker.stopped == 1  # killed before the report: FAILED holds no bytes


def test_stand_in_worker_that_exits_while_its_call_hangs_is_reported_once() -> None:
    """The worker exits but grpc says nothing about the call (no status, no cancel): the
    exit alone ends the transition, at once rather than at the time limit, and the exit is
    not also reported as a WorkerDied (the transition's report covers it)."""
    started = asyncio.Event()

    async def forever(*_: Any, **__: Any) -> Any:
        started.set()
        await asyncio.Event().wait()

    worker = StandInWorker(Suspend=forever)
    ex, reports = executor(worker, timeout_s=30)

    async def scenario() -> Any:
        ex.start(Suspend(RID, "m", 4, Tier.HOST, write_snapshot=False))
        await started.wait()
        worker.returncode = -9
        worker.exited.set()
        died = ex.on_worker_exit(worker)  # type: ignore[arg-type]
        await asyncio.wait_for(asyncio.gather(*ex._tasks), 5)
        return died

    assert asyncio.run(scenario()) is None
    assert [type(r) for r in reports] == [TransitionFailed]
    assert reports[0].error.reason == "WORKER_DIED" and "exit status -9" in str(reports[0].error)


def test_a_cancelled_transition_task_reports_and_stays_cancelled() -> None:
    """Cancelling the task itself (torpord shutting down) still reports the transition
    failed, and the cancellation goes on (rule 15)."""
    started = asyncio.Event()

    async def forever(*_: Any, **__: Any) -> Any:
        started.set()
        await asyncio.Event().wait()

    worker = StandInWorker(Suspend=forever)
    ex, reports = executor(worker)

    async def scenario() -> bool:
        ex.start(Suspend(RID, "m", 4, Tier.HOST, write_snapshot=False))
        (task,) = ex._tasks
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task.cancelled()

    assert asyncio.run(scenario())
    assert [type(r) for r in reports] == [TransitionFailed]


def test_a_worker_that_never_answers_is_killed_and_the_transition_fails() -> None:
    async def forever(*_: Any, **__: Any) -> Any:
        await asyncio.Event().wait()

    worker = StandInWorker(Suspend=forever)
    ex, reports = executor(worker, timeout_s=0.2)
    asyncio.run(run(ex, Suspend(RID, "m", 5, Tier.HOST, write_snapshot=False)))
    assert [type(r) for r in reports] == [TransitionFailed]
    assert isinstance(reports[0].error, DeadlineExceeded)
    assert worker.killed >= 1


def test_a_stream_that_goes_silent_is_a_hung_worker() -> None:
    def silent(*_: Any, **__: Any) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            progress = common_pb2.TransferProgress(bytes_done=1, bytes_total=2)
            yield worker_pb2.WorkerResumeResponse(progress=progress)
            await asyncio.Event().wait()

        return gen()

    worker = StandInWorker(Resume=silent)
    ex, reports = executor(worker, timeout_s=0.2)
    asyncio.run(run(ex, RESUME_DISK))
    assert [type(r) for r in reports] == [TransitionFailed]
    assert isinstance(reports[0].error, DeadlineExceeded)


def test_a_worker_that_cannot_be_reaped_does_not_hold_the_report_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("torpor.scheduler.executor.REAP_MARGIN_S", 0.2)

    async def fails(*_: Any, **__: Any) -> Any:
        raise Unavailable("boom")

    worker = StandInWorker(Suspend=fails)
    worker.hang_on_stop = True
    ex, reports = executor(worker, timeout_s=0.2)
    asyncio.run(run(ex, Suspend(RID, "m", 6, Tier.HOST, write_snapshot=False)))
    assert [type(r) for r in reports] == [TransitionFailed]


@pytest.mark.parametrize("others", [0, 1], ids=["checkpoint-next", "older-snapshot-next"])
def test_a_corrupt_snapshot_is_reported_in_one_failure_that_names_it(others: int) -> None:
    """No separate SnapshotDeleted (which the core refuses mid-restore): one TransitionFailed
    that says the snapshot was unusable and whether another one is left."""

    def corrupt(*_: Any, **__: Any) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            raise DataLoss("chunk is corrupt", reason="CHUNK_CORRUPT", metadata={"hash": "ab"})
            yield  # pragma: no cover

        return gen()

    worker = StandInWorker(Resume=corrupt)
    snapshots = Snapshots(others=others)
    ex, reports = executor(worker, snapshots)
    asyncio.run(run(ex, RESUME_DISK))
    assert [type(r) for r in reports] == [TransitionFailed]
    assert reports[0].snapshot_unusable
    assert reports[0].snapshot_left == bool(others)
    assert snapshots.forgotten == ["CHUNK_CORRUPT"]


def test_a_failure_that_is_not_the_snapshots_keeps_it() -> None:
    async def fails(*_: Any, **__: Any) -> Any:
        raise FailedPrecondition("no", reason="SOMETHING_ELSE")

    def stream(*_: Any, **__: Any) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            await fails()
            yield  # pragma: no cover

        return gen()

    snapshots = Snapshots()
    ex, reports = executor(StandInWorker(Resume=stream), snapshots)
    asyncio.run(run(ex, RESUME_DISK))
    assert [type(r) for r in reports] == [TransitionFailed]
    assert not reports[0].snapshot_unusable and snapshots.forgotten == []


def test_a_completed_transition_reports_once() -> None:
    async def suspended(*_: Any, **__: Any) -> Any:
        return worker_pb2.WorkerSuspendResponse(state=common_pb2.RUNTIME_STATE_SUSPENDED_HOST)

    ex, reports = executor(StandInWorker(Suspend=suspended))
    asyncio.run(run(ex, Suspend(RID, "m", 9, Tier.HOST, write_snapshot=False)))
    assert [type(r) for r in reports] == [TransitionCompleted]


def test_a_missing_worker_is_a_failed_transition() -> None:
    ex, reports = executor(None)
    asyncio.run(run(ex, Suspend(RID, "m", 2, Tier.HOST, write_snapshot=False)))
    assert [type(r) for r in reports] == [TransitionFailed]
