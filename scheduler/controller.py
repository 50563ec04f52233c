"""The one owner of the policy state in torpord: events in, plans out, actions dispatched.

Every decision is the pure core's (`torpor.scheduler.core.step`); this adapter only
- feeds it events (client requests, operator orders, completed transitions, ticks at the
  plan's `wake_at`),
- hands transition actions to the executor and routes the replies (Grant, Reject, EndLease,
  EvictFinished, ...) to the callers waiting for them, through `Ticket`s,
- broadcasts progress of loads and restores to the callers waiting for that model.
It runs on the event loop and never blocks: a step is pure computation (about a millisecond).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from torpor.log import get_logger
from torpor.scheduler import core
from torpor.scheduler.core import (
    AbortRequests,
    Decision,
    Drop,
    EndLease,
    Event,
    Load,
    Plan,
    Reject,
    Resume,
    SchedulerState,
    Suspend,
    Tick,
    Tier,
    VictimChoice,
)

log = get_logger("controller")

U = TypeVar("U")


@dataclass(frozen=True)
class Queued:
    """The request waits: `position` requests are ahead of it in its model's queue."""

    position: int
    depth: int


@dataclass(frozen=True)
class Evicting:
    """Room is being made for the request's model."""

    victims: tuple[VictimChoice, ...]


@dataclass(frozen=True)
class RestoreProgress:
    """Bytes of a load (`loading`) or a restore of the model's runtime moved so far."""

    model: str
    tier: Tier
    done: int
    total: int
    loading: bool


@dataclass
class Ticket:
    """A caller waiting for the core's answers to one request (or holding one lease)."""

    request_id: str
    model: str
    updates: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    lease_id: str | None = None
    progress: bool = True  # wants Progress/Evicting/Queued notices

    async def next(self, kind: type[U]) -> U:
        """The next update of `kind`, skipping others; a rejection raises its error."""
        while True:
            update = await self.updates.get()
            if isinstance(update, kind):
                return update
            if isinstance(update, Reject):
                raise update.error


class Executor(Protocol):
    def start(self, action: Load | Resume | Suspend | Drop) -> None: ...

    def start_exchange(self, action: core.Exchange) -> None: ...

    def abort_requests(self, runtime_id: str) -> None: ...


class Controller:
    """Applies events to the policy state and dispatches the resulting plans."""

    def __init__(
        self,
        state: SchedulerState,
        executor: Executor,
        clock: Callable[[], float] = time.monotonic,
        on_plan: Callable[[SchedulerState, SchedulerState, Plan], None] | None = None,
    ) -> None:
        self.state = state
        self.executor = executor
        self.clock = clock
        self.on_plan = on_plan
        self.tickets: dict[str, Ticket] = {}
        self.lease_tickets: dict[str, Ticket] = {}
        self._ids = itertools.count(1)
        self._wake: asyncio.TimerHandle | None = None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # -- events ---------------------------------------------------------------------------

    def submit(self, event: Event) -> Plan:
        """Step the core; raises the TorporError of an invalid command (state unchanged)."""
        before = self.state
        self.state, plan = core.step(before, event, self.clock())
        self._dispatch(plan)
        self._schedule_wake(plan.wake_at)
        if self.on_plan is not None:
            self.on_plan(before, self.state, plan)
        return plan

    def explain(self, model: str, priority: int = 0) -> Decision:
        return core.explain(self.state, model, self.clock(), priority)

    def open(self, request_id: str, model: str, *, progress: bool = True) -> Ticket:
        ticket = Ticket(request_id, model, progress=progress)
        self.tickets[request_id] = ticket
        return ticket

    def close(self, ticket: Ticket) -> None:
        self.tickets.pop(ticket.request_id, None)
        if ticket.lease_id is not None:
            self.lease_tickets.pop(ticket.lease_id, None)

    def progress(self, model: str, tier: Tier, done: int, total: int, loading: bool) -> None:
        """A load or restore of `model`'s runtime moved bytes: tell whoever waits for it."""
        note = RestoreProgress(model, tier, done, total, loading)
        for ticket in self.tickets.values():
            if ticket.model == model and ticket.progress and ticket.lease_id is None:
                ticket.updates.put_nowait(note)

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, plan: Plan) -> None:
        for action in plan.actions:
            if isinstance(action, Load | Resume | Suspend | Drop):
                self.executor.start(action)
            elif isinstance(action, core.Exchange):
                self.executor.start_exchange(action)
            elif isinstance(action, AbortRequests):
                self.executor.abort_requests(action.runtime_id)
            elif isinstance(action, EndLease):
                self._end_lease(action)
            else:
                self._reply(action)
        self._notify_waiting(plan)

    def _reply(self, action: Any) -> None:
        request_id = getattr(action, "request_id", None)
        ticket = self.tickets.get(request_id) if request_id else None
        if ticket is None:
            return
        if isinstance(action, core.Grant):
            ticket.lease_id = action.lease_id
            self.lease_tickets[action.lease_id] = ticket
        ticket.updates.put_nowait(action)

    def _end_lease(self, action: EndLease) -> None:
        ticket = self.lease_tickets.pop(action.lease_id, None)
        if ticket is not None:
            ticket.updates.put_nowait(action)

    def _notify_waiting(self, plan: Plan) -> None:
        """Queued positions and evictions, for callers still waiting for a grant."""
        evicting = {d.model: d.victims for d in plan.decisions if d.victims}
        for model, waiters in self.state.queues.items():
            for position, waiter in enumerate(waiters):
                ticket = self.tickets.get(waiter.request_id)
                if ticket is None or not ticket.progress:
                    continue
                ticket.updates.put_nowait(Queued(position, len(waiters)))
                if model in evicting:
                    ticket.updates.put_nowait(Evicting(evicting[model]))

    def _schedule_wake(self, wake_at: float | None) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if wake_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, wake_at - self.clock())
        self._wake = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._wake = None
        try:
            self.submit(Tick())
        except Exception as exc:  # a bug in the core must not kill the timer silently
            log.error("tick_failed", error=repr(exc))

    def close_all(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
