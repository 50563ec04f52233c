"""torpor.rpc_status's grpc.aio servicer wrapper and a call whose deadline has passed: it
sends nothing (no message, no status) and ends quietly, since grpc's core ends such a call
itself and logs a traceback for a send that loses that race (issue 12, found by the load
suite). Deterministic, with a stand-in servicer context; tests/reliability/
test_deadline_log.py shows it against a real torpord."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from torpor.errors import DeadlineExceeded, Unavailable
from torpor.rpc_status import aio_servicer_errors


class ExecuteBatchError(Exception):
    """Stands in for grpc's private cygrpc.ExecuteBatchError (told by name)."""


class AbortError(Exception):
    """Stands in for grpc's AbortError, raised by a status that was sent."""


class StandInContext:
    def __init__(self, remaining: float | None, send_fails: bool = False) -> None:
        self.remaining = remaining
        self.send_fails = send_fails
        self.sent: list[Any] = []

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort_with_status(self, status: Any) -> None:
        if self.send_fails:
            raise ExecuteBatchError('Failed "execute_batch"')
        self.sent.append(status.code)
        raise AbortError


class Servicer:
    def __init__(self, error: Exception | None, items: int = 0) -> None:
        self.error = error
        self.items = items
        self.closed = False

    @aio_servicer_errors
    async def Stream(self, request: Any, context: Any) -> AsyncIterator[int]:
        try:
            for i in range(self.items):
                yield i
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True

    @aio_servicer_errors
    async def Unary(self, request: Any, context: Any) -> int:
        if self.error is not None:
            raise self.error
        return 1


async def _drain(servicer: Servicer, context: StandInContext) -> list[int]:
    return [item async for item in servicer.Stream(None, context)]


def test_stand_in_own_deadline_at_the_calls_deadline_sends_no_status() -> None:
    context = StandInContext(remaining=0.01)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_drain(Servicer(DeadlineExceeded("queued too long")), context))
    assert context.sent == []
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(Servicer(DeadlineExceeded("queued too long")).Unary(None, context))
    assert context.sent == []


def test_stand_in_no_message_is_written_after_the_deadline() -> None:
    servicer = Servicer(None, items=3)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_drain(servicer, StandInContext(remaining=0.0)))
    assert servicer.closed  # the servicer's own clean-up ran (its lease, its queue place)


def test_stand_in_a_status_send_that_loses_the_race_ends_quietly() -> None:
    context = StandInContext(remaining=5.0, send_fails=True)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_drain(Servicer(Unavailable("gone")), context))


def test_stand_in_a_live_call_gets_its_error_and_its_messages() -> None:
    context = StandInContext(remaining=5.0)
    with pytest.raises(AbortError):
        asyncio.run(_drain(Servicer(DeadlineExceeded("the worker was slow")), context))
    assert [c.name for c in context.sent] == ["DEADLINE_EXCEEDED"]
    assert asyncio.run(_drain(Servicer(None, items=3), StandInContext(None))) == [0, 1, 2]
    other = StandInContext(remaining=0.01)  # near the deadline, another error still goes out
    with pytest.raises(AbortError):
        asyncio.run(_drain(Servicer(Unavailable("gone")), other))
    assert [c.name for c in other.sent] == ["UNAVAILABLE"]
