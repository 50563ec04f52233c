"""The owner of in-flight worker calls (scheduler/inflight.py), with stand-in grpc calls.

Every way a proxied Generate can end reaches its client as the right typed error: an
eviction's abort (ABORTED, REQUEST_ABORTED, counted once for the eviction's report), a worker
that exited (UNAVAILABLE, WORKER_DIED), a broken call; and a client that goes away cancels
the worker's call. The real torpord paths are in tests/cli/test_real_daemon.py (evict
--mode abort) and tests/daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from torpor.errors import Aborted, ResourceExhausted, TorporError, Unavailable
from torpor.scheduler.inflight import InflightCalls

RID = "m#1"


class StandInCall:
    """A stand-in for a grpc.aio streaming call: its messages come from a queue, and
    `cancel()` ends a read in progress with CancelledError, as grpc.aio does."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False
        self.reading = asyncio.Event()  # its stream reached the first read: it is tracked

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._read()

    async def _read(self) -> AsyncIterator[Any]:
        self.reading.set()
        while (item := await self.messages.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> bool:
        self.cancelled = True
        self.messages.put_nowait(asyncio.CancelledError())
        return True


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


async def consume(calls: InflightCalls, call: StandInCall, exited: asyncio.Event) -> list[Any]:
    return [m async for m in calls.stream(RID, "m", call, exited)]


async def started(calls: InflightCalls, *running: StandInCall) -> None:
    """Wait until the consumers of `running` have reached their first read."""
    async with asyncio.timeout(5):
        for call in running:
            await call.reading.wait()
    assert calls.running(RID) == len(running)


async def test_a_completed_call_is_no_longer_tracked() -> None:
    calls, call = InflightCalls(), StandInCall()
    for item in ("a", "b", None):
        call.messages.put_nowait(item)
    assert await consume(calls, call, asyncio.Event()) == ["a", "b"]
    assert calls.running(RID) == 0 and not call.cancelled


async def test_an_abort_ends_every_call_with_request_aborted_and_is_counted_once() -> None:
    calls = InflightCalls()
    pair = [StandInCall(), StandInCall()]
    tasks = [asyncio.create_task(consume(calls, c, asyncio.Event())) for c in pair]
    await started(calls, *pair)
    calls.abort(RID)
    for task in tasks:
        with pytest.raises(Aborted) as caught:
            await task
        assert caught.value.reason == "REQUEST_ABORTED"
    assert all(c.cancelled for c in pair)
    assert calls.take_aborted(RID) == 2
    assert calls.take_aborted(RID) == 0  # reported by one eviction only
    assert calls.running(RID) == 0


async def test_a_worker_exit_ends_its_calls_with_worker_died() -> None:
    calls, call = InflightCalls(), StandInCall()
    task = asyncio.create_task(consume(calls, call, asyncio.Event()))
    await started(calls, call)
    calls.worker_exited(RID, "m")
    with pytest.raises(Unavailable) as caught:
        await task
    assert caught.value.reason == "WORKER_DIED" and "worker of m exited" in str(caught.value)
    assert calls.take_aborted(RID) == 0


@pytest.mark.parametrize(
    ("code", "exited", "error", "reason"),
    [
        (grpc.StatusCode.UNAVAILABLE, True, Unavailable, "WORKER_DIED"),  # its worker exited
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True, Unavailable, "WORKER_DIED"),
        (grpc.StatusCode.UNAVAILABLE, False, Unavailable, "WORKER_DIED"),  # went away
        (grpc.StatusCode.CANCELLED, False, Aborted, "REQUEST_ABORTED"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False, ResourceExhausted, None),  # the worker's
    ],
)
async def test_a_broken_call_is_a_typed_error(
    code: grpc.StatusCode, exited: bool, error: type[TorporError], reason: str | None
) -> None:
    calls, call, gone = InflightCalls(), StandInCall(), asyncio.Event()
    if exited:
        gone.set()
    call.messages.put_nowait(rpc_error(code))
    with pytest.raises(error) as caught:
        await consume(calls, call, gone)
    if reason is not None:
        assert caught.value.reason == reason
    assert calls.running(RID) == 0


async def test_a_client_that_goes_away_cancels_the_workers_call() -> None:
    calls, call = InflightCalls(), StandInCall()
    task = asyncio.create_task(consume(calls, call, asyncio.Event()))
    await started(calls, call)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call.cancelled and calls.running(RID) == 0
    assert calls.take_aborted(RID) == 0
