"""torpord's calls to a worker during a transition, each bounded: by the worker's exit and
by a time limit.

A transition must end in a report whatever its worker does (docs/RELIABILITY.md, "Hangs and
wedged models"; issue 12, "a worker killed mid-transition wedges its model"). So:
- a worker that exits mid-call ends the call at once (Unavailable, WORKER_DIED), whatever
  grpc makes of its closed channel: a status, or a CancelledError raised in the caller;
- a worker that stops answering (stuck in a driver call, stopped, deadlocked) fails the call
  after `timeout_s` (DeadlineExceeded, WORKER_HUNG), and the executor kills it.
Streams (Load, Resume and Snapshot report progress as they go) get the limit per message,
so a long load that keeps reporting is never cut short.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from torpor.errors import DeadlineExceeded, TorporError, Unavailable
from torpor.rpc_status import from_rpc_error

T = TypeVar("T")

WORKER_DIED = "WORKER_DIED"
WORKER_HUNG = "WORKER_HUNG"


class Watched(Protocol):
    """What the bounds need of a worker process: when it exited, and how."""

    exited: asyncio.Event
    returncode: int | None


async def unary(
    worker: Watched,
    method: Callable[[Any], Awaitable[T]],
    request: Any,
    timeout_s: float,
    what: str,
) -> T:
    """The reply of a unary worker call, or the typed error of its failure."""
    if worker.exited.is_set():  # its channel is closed: a call would not even start
        raise died(worker, what)
    return await _first(worker, method(request), timeout_s, what)


async def stream(
    worker: Watched, method: Callable[[Any], Any], request: Any, timeout_s: float, what: str
) -> AsyncIterator[Any]:
    """The messages of a streaming worker call; each must come within `timeout_s`."""
    if worker.exited.is_set():
        raise died(worker, what)
    call = method(request)
    messages = aiter(call)
    try:
        while True:
            try:
                message = await _first(worker, anext(messages), timeout_s, what)
            except StopAsyncIteration:
                return
            yield message
    finally:
        if isinstance(call, grpc.aio.Call):
            call.cancel()  # no-op once it ended; ends it when we stop early


async def _first(worker: Watched, call: Awaitable[T], timeout_s: float, what: str) -> T:
    """Whichever comes first: the call's result, the worker's exit, or the time limit."""
    pending = asyncio.ensure_future(call)
    exited = asyncio.ensure_future(worker.exited.wait())
    try:
        done, _ = await asyncio.wait(
            {pending, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        exited.cancel()
        if not pending.done():
            pending.cancel()  # cancelling the awaiting of a grpc call cancels the call
    if pending in done and not pending.cancelled():
        try:
            return pending.result()
        except grpc.aio.AioRpcError as exc:
            if worker.exited.is_set():
                raise died(worker, what) from exc
            raise from_rpc_error(exc) from exc
    if pending in done or exited in done:
        # A call grpc cancelled ends here too: it closes the channel of a worker that exited.
        raise died(worker, what)
    raise DeadlineExceeded(
        f"the worker did not answer within {timeout_s:g} s during the {what} "
        "(worker.transition_timeout_s)",
        reason=WORKER_HUNG,
        metadata={"timeout_s": f"{timeout_s:g}"},
    )


def died(worker: Watched, what: str) -> TorporError:
    """The error of a transition whose worker exited (or whose channel closed) under it."""
    status = "" if worker.returncode is None else f" (exit status {worker.returncode})"
    if not worker.exited.is_set():
        status = " (its channel closed)"
    return Unavailable(f"the worker exited during the {what}{status}", reason=WORKER_DIED)
