"""Carries out an exchange swap (core.Exchange, docs/POLICY.md "Exchange swap") on its two
workers, and reports how both sides ended.

torpord makes the exchange board (torpor/exchange_board.py) in its runtime directory, with
the slack the core granted, and calls Worker.Exchange on both workers at once: the outgoing
side (GPU -> host) and the incoming one (host -> GPU). Both done: TransitionCompleted for
each. A side failed: the exchange is run the other way round on a new board (each worker
moves back only what it had moved; a side that never moved has nothing to do), and both are
reported TransitionRolledBack with the first error: both runtimes are where they started,
their workers alive. If that fails too, or a worker died or hung (nothing to move back with),
both workers are killed and both reported TransitionFailed (the core's rule: a FAILED runtime
holds nothing). Every worker call is bounded (worker_calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.errors import Internal, TorporError
from torpor.exchange_board import Board
from torpor.log import bind, get_logger
from torpor.scheduler import worker_calls
from torpor.scheduler.core import (
    Exchange,
    RuntimeState,
    TransitionCompleted,
    TransitionFailed,
    TransitionRolledBack,
)
from torpor.v1 import worker_pb2

log = get_logger("exchange")

OUT, IN = worker_pb2.EXCHANGE_SIDE_OUT, worker_pb2.EXCHANGE_SIDE_IN
MARGIN_S = 10.0
"""How much longer than the exchange's own timeout torpord waits for a worker's answer (at
most as long again as the timeout)."""
GONE = frozenset({worker_calls.WORKER_HUNG, worker_calls.WORKER_DIED})
"""A side that failed this way has no worker left to move back: no rollback is tried."""


class ExchangeRunner:
    """Runs Exchange actions with the executor's workers, bounds and reports."""

    def __init__(self, executor: Any, report: Callable[[Any], None]) -> None:
        self.executor = executor  # workers, bounds, kill, metrics, busy set
        self.report = report  # the executor's: a report the core refuses is logged

    async def run(self, action: Exchange) -> None:
        ex = self.executor
        ids = (action.out_runtime_id, action.in_runtime_id)
        start = time.perf_counter()
        with bind(model=action.in_model, runtime=action.in_runtime_id, out=action.out_model):
            try:
                error = await self._both(action, forward=True)
                if error is None:
                    seconds = time.perf_counter() - start
                    log.info("exchanged", seconds=round(seconds, 4), gpu=action.gpu)
                    if ex.metrics is not None:
                        ex.metrics.observe_resume("host", seconds)
                    ex.restores[action.in_runtime_id] = seconds
                    self._done(action)
                    return
                log.warning("exchange_failed", error=str(error), reason=error.reason)
                undo = error if error.reason in GONE else await self._both(action, forward=False)
                if undo is None:
                    log.warning("exchange_rolled_back", reason=error.reason)
                    self._rolled_back(action, error)
                    return
                log.error("exchange_rollback_failed", error=str(undo), reason=undo.reason)
                await self._fail(action, undo)
            except BaseException as exc:  # every way out is reported, as the executor's
                failure = exc if isinstance(exc, TorporError) else Internal(f"exchange: {exc!r}")
                await self._fail(action, failure)
                if not isinstance(exc, Exception):
                    raise
            finally:
                for rid in ids:
                    ex.busy.discard(rid)

    async def _both(self, action: Exchange, forward: bool) -> TorporError | None:
        """Both sides on one board (`forward`: as planned; else the other way round); the
        first error, or None."""
        ex = self.executor
        out_id, in_id = action.out_runtime_id, action.in_runtime_id
        if not forward:
            out_id, in_id = in_id, out_id
        out_w, in_w = ex._require_worker(out_id), ex._require_worker(in_id)
        timeout = ex.defaults.transition_timeout_s
        path = _board_path(ex.defaults.runtime_dir, action, forward)
        board = Board.create(path, action.host_slack, action.gpu_slack)
        try:
            results = await asyncio.gather(
                self._side(out_w, OUT, path, timeout),
                self._side(in_w, IN, path, timeout),
                return_exceptions=True,
            )
        finally:
            board.close()
            with contextlib.suppress(OSError):
                path.unlink()
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in errors:
            if not isinstance(r, Exception):
                raise r  # a cancellation goes on
        typed = [r for r in errors if isinstance(r, TorporError)]
        if errors and not typed:
            return Internal(f"exchange: {errors[0]!r}")
        # The side that failed first says why; the other only stopped (EXCHANGE_PEER_FAILED).
        typed.sort(key=lambda e: e.reason == "EXCHANGE_PEER_FAILED")
        return typed[0] if typed else None

    async def _side(
        self, worker: Any, side: worker_pb2.ExchangeSide, board: Path, timeout_s: float
    ) -> Any:
        request = worker_pb2.WorkerExchangeRequest(side=side, board_path=str(board))
        request.timeout.FromSeconds(max(1, int(timeout_s)))
        what = f"exchange {'out' if side == OUT else 'in'}"
        bound = timeout_s + min(MARGIN_S, timeout_s)
        return await worker_calls.unary(worker, worker.stub.Exchange, request, bound, what)

    def _done(self, action: Exchange) -> None:
        self.report(TransitionCompleted(action.out_runtime_id, action.out_seq, _HOST))
        self.report(TransitionCompleted(action.in_runtime_id, action.in_seq, _RESIDENT))

    def _rolled_back(self, action: Exchange, error: TorporError) -> None:
        self.report(TransitionRolledBack(action.out_runtime_id, action.out_seq, error))
        self.report(TransitionRolledBack(action.in_runtime_id, action.in_seq, error))

    async def _fail(self, action: Exchange, error: TorporError) -> None:
        """Kill both workers (a runtime part way through an exchange cannot serve), then
        report both failed; the reports go out even if this is cancelled meanwhile."""
        try:
            for rid in (action.out_runtime_id, action.in_runtime_id):
                await self.executor._kill(rid, now=True)
        finally:
            self.report(TransitionFailed(action.out_runtime_id, action.out_seq, error))
            self.report(TransitionFailed(action.in_runtime_id, action.in_seq, error))


_HOST = RuntimeState.SUSPENDED_HOST
_RESIDENT = RuntimeState.RESIDENT


def _board_path(runtime_dir: Path, action: Exchange, forward: bool) -> Path:
    """The board of one exchange (or its rollback), in torpord's runtime directory: short,
    private, and unique per op sequence."""
    folder = runtime_dir / "exchanges"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{action.out_seq}-{action.in_seq}{'' if forward else '-back'}.board"


__all__ = ["ExchangeRunner"]
