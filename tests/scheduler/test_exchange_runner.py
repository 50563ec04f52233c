"""torpord's side of an exchange swap (scheduler/exchanges.py) with stand-in workers (fake
stubs and processes; tests/daemon/test_exchange_swap.py runs real ones): both sides done is
two completions; a side that fails is rolled back by the exchange the other way, reported as
two rollbacks with the failing side's reason and no worker killed; a rollback that fails too
kills both workers and reports both failed; a worker that never answers is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.scheduler.test_executor_reports import (
    SOURCE,
    Snapshots,
    StandInWorker,
    worker_defaults,
)
from torpor.errors import FailedPrecondition, Unavailable
from torpor.exchange_board import Board
from torpor.scheduler.core import (
    Exchange,
    RuntimeState,
    TransitionCompleted,
    TransitionFailed,
    TransitionRolledBack,
)
from torpor.scheduler.executor import Executor
from torpor.v1 import common_pb2, worker_pb2

ACTION = Exchange("a#1", "a", 11, "b#2", "b", 12, gpu=0, host_slack=1 << 20, gpu_slack=0)
OUT, IN = worker_pb2.EXCHANGE_SIDE_OUT, worker_pb2.EXCHANGE_SIDE_IN


def worker(rid: str, answer: Callable[[Any], Any]) -> StandInWorker:
    async def exchange(request: Any, **_: Any) -> Any:
        Board.open(Path(request.board_path)).close()  # torpord made the board first
        return await answer(request)

    w = StandInWorker(Exchange=exchange)
    w.runtime_id = rid
    return w


def done(state: int) -> Callable[[Any], Any]:
    async def answer(request: Any) -> Any:
        return worker_pb2.WorkerExchangeResponse(state=state, bytes=1, steps=1)

    return answer


def scripted(*answers: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Each call gets the next answer (the forward exchange, then its rollback)."""
    queue = list(answers)

    async def answer(request: Any) -> Any:
        return await queue.pop(0)(request)

    return answer


def fails(error: Exception) -> Callable[[Any], Any]:
    async def answer(request: Any) -> Any:
        raise error

    return answer


async def hangs(request: Any) -> Any:
    await asyncio.Event().wait()


def run(tmp_path: Path, a: StandInWorker, b: StandInWorker, timeout_s: float = 30.0) -> list[Any]:
    reports: list[Any] = []
    supervisor = type("Supervisor", (), {"workers": {"a#1": a, "b#2": b}})()
    ex = Executor(
        supervisor,  # type: ignore[arg-type]
        worker_defaults(timeout_s, tmp_path),
        {"a": SOURCE, "b": SOURCE},
        reports.append,
        lambda *_: None,
        Snapshots(),
    )

    async def go() -> None:
        ex.start_exchange(ACTION)
        assert ex.busy == {"a#1", "b#2"}
        await asyncio.wait_for(asyncio.gather(*ex._tasks, return_exceptions=True), 20)
        assert not ex.busy

    asyncio.run(go())
    assert not list((tmp_path / "exchanges").iterdir())  # every board removed
    return reports


HOST, RESIDENT = common_pb2.RUNTIME_STATE_SUSPENDED_HOST, common_pb2.RUNTIME_STATE_RESIDENT


def test_both_sides_done_is_two_completions(tmp_path: Path) -> None:
    a, b = worker("a#1", done(HOST)), worker("b#2", done(RESIDENT))
    reports = run(tmp_path, a, b)
    assert reports == [
        TransitionCompleted("a#1", 11, RuntimeState.SUSPENDED_HOST),
        TransitionCompleted("b#2", 12, RuntimeState.RESIDENT),
    ]
    assert a.killed == b.killed == 0


def test_a_failed_side_is_rolled_back_the_other_way(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def log(name: str, answer: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def wrapped(request: Any) -> Any:
            seen.append((name, request.side))
            return await answer(request)

        return wrapped

    broken = FailedPrecondition("no host copy", reason="HOST_COPY_FAILED")
    peer = Unavailable("the other side failed", reason="EXCHANGE_PEER_FAILED")
    a = worker("a#1", log("a", scripted(fails(peer), done(RESIDENT))))
    b = worker("b#2", log("b", scripted(fails(broken), done(HOST))))
    reports = run(tmp_path, a, b)
    assert sorted(seen) == [("a", OUT), ("a", IN), ("b", OUT), ("b", IN)]
    assert [type(r) for r in reports] == [TransitionRolledBack, TransitionRolledBack]
    assert {(r.runtime_id, r.seq) for r in reports} == {("a#1", 11), ("b#2", 12)}
    assert all(r.error.reason == "HOST_COPY_FAILED" for r in reports)  # the cause, not the echo
    assert a.killed == b.killed == a.stopped == b.stopped == 0  # both workers keep serving


def test_a_failed_rollback_fails_both_and_kills_both_workers(tmp_path: Path) -> None:
    broken = FailedPrecondition("bad", reason="EXCHANGE_BYTES_LOST")
    a = worker("a#1", fails(broken))
    b = worker("b#2", done(RESIDENT))
    reports = run(tmp_path, a, b)
    assert [type(r) for r in reports] == [TransitionFailed, TransitionFailed]
    assert all(r.error.reason == "EXCHANGE_BYTES_LOST" for r in reports)
    assert a.killed == 1 and b.killed == 1


def test_a_worker_that_never_answers_is_bounded(tmp_path: Path) -> None:
    a, b = worker("a#1", hangs), worker("b#2", done(RESIDENT))
    reports = run(tmp_path, a, b, timeout_s=0.2)
    assert [type(r) for r in reports] == [TransitionFailed, TransitionFailed]
    assert a.killed == 1 and b.killed == 1
