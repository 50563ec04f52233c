"""The Generate calls torpord proxies to its workers while they run: the one owner of them.

A client's Generate is forwarded to its runtime's worker as one streaming call. The call
can end four ways, and the client must learn which (never a hang):
- it completes, or fails with the worker's own typed error;
- an eviction in ABORT mode ends it (`abort`): ABORTED, REQUEST_ABORTED, and the eviction
  reports how many it aborted (`take_aborted`);
- its worker exits (`worker_exited`): UNAVAILABLE, WORKER_DIED;
- its client goes away: the worker's call is cancelled too.
The API streams through `stream`; the executor calls `abort` and `worker_exited`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

import grpc

from torpor.errors import Aborted, TorporError, Unavailable
from torpor.rpc_status import from_rpc_error


class WorkerCall(Protocol):
    """A streaming worker call as grpc.aio makes it: iterated, and cancellable."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def cancel(self) -> bool: ...


class InflightCalls:
    """The worker calls running per runtime, and why torpord ended the ones it ended."""

    def __init__(self) -> None:
        self._calls: dict[str, set[WorkerCall]] = {}  # runtime -> its calls in flight
        self._why: dict[WorkerCall, TorporError] = {}  # a call we cancelled -> its error
        self._aborted: dict[str, int] = {}  # runtime -> calls aborted, not yet reported

    def running(self, runtime_id: str) -> int:
        """How many calls run on `runtime_id` now."""
        return len(self._calls.get(runtime_id, ()))

    async def stream(
        self, runtime_id: str, model: str, call: WorkerCall, exited: asyncio.Event
    ) -> AsyncGenerator[Any]:
        """The messages of `call` on `runtime_id` (whose worker sets `exited`), tracked
        while it runs; an ending it did not choose raises the error the client gets."""
        calls = self._calls.setdefault(runtime_id, set())
        calls.add(call)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            why = self._why.pop(call, None)
            if why is None and exited.is_set():
                why = _died(model)
            raise (why or worker_error(exc, model)) from exc
        except asyncio.CancelledError:
            why = self._why.pop(call, None)
            task = asyncio.current_task()
            if why is None or (task is not None and task.cancelling()):
                call.cancel()  # our client went away: stop the worker's work too
                raise
            raise why from None  # we cancelled it: the worker died, or an eviction aborted it
        finally:
            calls.discard(call)
            if not calls:
                self._calls.pop(runtime_id, None)
            self._why.pop(call, None)

    def abort(self, runtime_id: str) -> None:
        """An eviction in ABORT mode: end every call on `runtime_id` (REQUEST_ABORTED)."""
        self._aborted[runtime_id] = self._aborted.get(runtime_id, 0) + self.running(runtime_id)
        self._cancel(
            runtime_id,
            Aborted(
                f"the request on {runtime_id} was aborted by an eviction", reason="REQUEST_ABORTED"
            ),
        )

    def take_aborted(self, runtime_id: str) -> int:
        """Calls aborted on `runtime_id` since the last take (an eviction's report)."""
        return self._aborted.pop(runtime_id, 0)

    def worker_exited(self, runtime_id: str, model: str) -> None:
        """The worker of `runtime_id` exited: its calls end with WORKER_DIED."""
        self._cancel(runtime_id, _died(model))

    def _cancel(self, runtime_id: str, why: TorporError) -> None:
        for call in list(self._calls.get(runtime_id, ())):
            self._why[call] = why
            call.cancel()


def _died(model: str) -> Unavailable:
    return Unavailable(f"the worker of {model} exited during the request", reason="WORKER_DIED")


def worker_error(exc: grpc.aio.AioRpcError, model: str) -> TorporError:
    """A worker call that broke on its own: a worker that died (or was evicted with ABORT)
    is UNAVAILABLE or ABORTED for the client, never a hang."""
    if exc.code() == grpc.StatusCode.CANCELLED:
        return Aborted(f"the request on {model} was aborted (eviction)", reason="REQUEST_ABORTED")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(
            f"the worker of {model} went away during the request", reason="WORKER_DIED"
        )
    return from_rpc_error(exc)
