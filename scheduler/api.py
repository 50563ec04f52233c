"""`torpor.v1.Scheduler`: the clients' service (asyncio). A thin adapter: it validates,
turns requests into core events through the controller, and streams the answers back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torpor.errors import NotFound, TorporError, Unavailable
from torpor.log import bind
from torpor.rpc_status import aio_servicer_errors as aio_errors
from torpor.scheduler import convert, validate
from torpor.scheduler.controller import Evicting, Queued, RestoreProgress, Ticket
from torpor.scheduler.core import (
    AcquireRequested,
    ClientGone,
    EndLease,
    Grant,
    LeaseEnd,
    LeaseReleased,
    PrefetchDone,
    PrefetchRequested,
    Reject,
    Renewed,
    RenewRequested,
    RequestFinished,
    RequestStarted,
    RuntimeState,
    Tier,
)
from torpor.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2

if TYPE_CHECKING:
    from torpor.scheduler.controller import Controller
    from torpor.scheduler.inflight import InflightCalls
    from torpor.scheduler.metrics import Metrics
    from torpor.scheduler.registry import ModelRegistry
    from torpor.scheduler.supervisor import WorkerProcess

_LEASE_ERRORS = {LeaseEnd.REVOKED, LeaseEnd.WORKER_DIED}


class Workers(Protocol):
    """The executor, as the API sees it: a runtime's worker, and its last restore's time."""

    def worker(self, runtime_id: str) -> WorkerProcess | None: ...

    def restore_seconds(self, runtime_id: str) -> float: ...


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    """Each collaborator is the one owner of what it is asked about."""

    def __init__(
        self,
        *,
        controller: Controller,
        models: ModelRegistry,
        workers: Workers,
        calls: InflightCalls,
        clocks: convert.Clocks,
        metrics: Metrics | None = None,
    ) -> None:
        self.controller = controller
        self.models = models
        self.workers = workers
        self.calls = calls
        self.clocks = clocks
        self.metrics = metrics

    # -- models ---------------------------------------------------------------------------

    @aio_errors
    async def RegisterModel(self, request: Any, context: Any) -> Any:
        validate.model_spec(request.spec)
        model = await self.models.register(request.spec, request.chat_template)
        return scheduler_pb2.RegisterModelResponse(model=model)

    @aio_errors
    async def UnregisterModel(self, request: Any, context: Any) -> Any:
        validate.required(request.name, "name")
        await self.models.unregister(request.name, request.delete_snapshots)
        return scheduler_pb2.UnregisterModelResponse()

    @aio_errors
    async def GetModel(self, request: Any, context: Any) -> Any:
        validate.required(request.name, "name")
        return scheduler_pb2.GetModelResponse(model=await self.models.model_message(request.name))

    @aio_errors
    async def ListModels(self, request: Any, context: Any) -> Any:
        names = self.models.names()
        return scheduler_pb2.ListModelsResponse(
            models=[await self.models.model_message(n) for n in names]
        )

    # -- leases ---------------------------------------------------------------------------

    @aio_errors
    async def Acquire(self, request: Any, context: Any) -> AsyncIterator[Any]:
        ctl = self.controller
        request_id = ctl.new_id("acq")
        event = self._acquire_event(request, request_id, context)  # checked before it queues
        ticket = ctl.open(request_id, request.model)
        try:
            with bind(model=request.model, request=request_id):
                ctl.submit(event)
                grant = None
                async for update in self._until_granted(ticket):
                    if isinstance(update, Grant):
                        grant = update
                    else:
                        yield update
                assert grant is not None
                yield scheduler_pb2.AcquireEvent(ready=self._ready(grant))
                end = await ticket.next(EndLease)  # held until the lease ends
                if end.why in _LEASE_ERRORS and end.error is not None:
                    raise end.error
        finally:
            ctl.close(ticket)
            self._client_gone(request_id)  # its lease (or its place in the queue) ends

    def _acquire_event(self, request: Any, request_id: str, context: Any) -> AcquireRequested:
        validate.required(request.model, "model")
        validate.priority(request.priority)
        deadline = None
        if request.HasField("deadline"):
            deadline = self.clocks.monotonic(validate.timestamp_s(request.deadline, "deadline"))
        ttl = None
        if request.HasField("lease_ttl"):
            ttl = validate.duration(
                request.lease_ttl, "lease_ttl", validate.LEASE_TTL_S, "BAD_LEASE_TTL"
            )
        remaining = context.time_remaining()
        if remaining is not None:
            call_deadline = self.controller.clock() + remaining
            deadline = call_deadline if deadline is None else min(deadline, call_deadline)
        return AcquireRequested(
            request_id,
            request.model,
            client=request_id,
            priority=request.priority,
            deadline=deadline,
            lease_ttl_s=ttl,
        )

    async def _until_granted(self, ticket: Ticket) -> AsyncIterator[Any]:
        """AcquireEvents until the grant (yielded last, as the Grant itself); raises the
        rejection's error."""
        last_queued = None
        while True:
            update = await ticket.updates.get()
            if isinstance(update, Grant):
                yield update
                return
            if isinstance(update, Reject):
                raise update.error
            if isinstance(update, Queued) and update != last_queued:
                last_queued = update
                yield scheduler_pb2.AcquireEvent(
                    queued=scheduler_pb2.AcquireEvent.Queued(
                        position=update.position, queue_depth=update.depth
                    )
                )
            elif isinstance(update, Evicting):
                yield scheduler_pb2.AcquireEvent(
                    evicting=scheduler_pb2.AcquireEvent.Evicting(
                        victims=[convert.victim(v) for v in update.victims]
                    )
                )
            elif isinstance(update, RestoreProgress):
                progress = common_pb2.TransferProgress(
                    tier=convert.tier_name(update.tier),
                    bytes_done=update.done,
                    bytes_total=update.total,
                )
                key = "loading" if update.loading else "restoring"
                yield scheduler_pb2.AcquireEvent(**{key: progress})

    def _ready(self, grant: Grant) -> Any:
        worker = self.workers.worker(grant.runtime_id)
        endpoint = f"unix://{worker.spec.socket}" if worker is not None else ""
        return scheduler_pb2.AcquireEvent.Ready(
            lease_id=grant.lease_id,
            expires_at=convert.timestamp(self.clocks.wall(grant.expires_at)),
            gpu=grant.gpu,
            worker_endpoint=endpoint,
            runtime_id=grant.runtime_id,
        )

    def _client_gone(self, client: str) -> None:
        with contextlib.suppress(TorporError):  # already gone is fine
            self.controller.submit(ClientGone(client))

    @aio_errors
    async def Renew(self, request: Any, context: Any) -> Any:
        validate.required(request.lease_id, "lease_id", "LEASE_REQUIRED")
        ttl = None
        if request.HasField("ttl"):
            ttl = validate.duration(request.ttl, "ttl", validate.LEASE_TTL_S, "BAD_LEASE_TTL")
        plan = self.controller.submit(RenewRequested(request.lease_id, ttl))
        renewed = next(a for a in plan.actions if isinstance(a, Renewed))
        return scheduler_pb2.RenewResponse(
            expires_at=convert.timestamp(self.clocks.wall(renewed.expires_at))
        )

    @aio_errors
    async def Release(self, request: Any, context: Any) -> Any:
        validate.required(request.lease_id, "lease_id", "LEASE_REQUIRED")
        self.controller.submit(LeaseReleased(request.lease_id))
        return scheduler_pb2.ReleaseResponse()

    # -- generate ---------------------------------------------------------------------------

    @aio_errors
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for chunk in self.generate(request, self._deadline(context)):
            yield chunk

    async def generate(self, request: Any, deadline: float | None) -> AsyncIterator[Any]:
        """One generation, as `Generate` and the HTTP API (torpor.scheduler.http_api) both
        run it: validated, queued behind an implicit acquire (or on a lease), proxied to the
        worker, the usage filled with torpord's timings. `deadline` is on the controller's
        clock (None: none). Closing the iterator cancels the request and frees its slot."""
        start = self.controller.clock()
        target = validate.generate_request(request)  # before it queues, evicts or loads
        model = self._lease(request.lease_id).model if target == "lease_id" else request.model
        limits = self.models.limits.get(model)
        if limits is not None:  # an unknown model is the core's NOT_FOUND
            validate.for_model(request, limits)
        if target == "lease_id":
            grant, ticket = self._lease(request.lease_id), None
        else:
            grant, ticket = await self._implicit_acquire(request, deadline)
        granted = self.controller.clock()
        first: float | None = None
        code, usage = "CANCELLED", None
        try:
            async for chunk in self._proxy(grant, request):
                if first is None and chunk.token_ids:
                    first = self.controller.clock()
                if chunk.HasField("usage"):
                    times = _Times(start, granted, first or granted, self.controller.clock())
                    self._fill_usage(chunk.usage, grant, times)
                    code, usage = "OK", chunk.usage
                yield chunk
        except TorporError as err:
            code = err.code.value
            raise
        finally:
            if ticket is not None:
                self.controller.close(ticket)
                self._client_gone(ticket.request_id)
            if self.metrics is not None:
                self.metrics.request_done(
                    model,
                    code,
                    prompt_tokens=usage.prompt_tokens if usage is not None else 0,
                    generated_tokens=usage.completion_tokens if usage is not None else 0,
                )

    async def _implicit_acquire(self, request: Any, deadline: float | None) -> tuple[Grant, Ticket]:
        ctl = self.controller
        request_id = ctl.new_id("gen")
        ticket = ctl.open(request_id, request.model, progress=False)
        try:
            ctl.submit(
                AcquireRequested(
                    request_id,
                    request.model,
                    client=request_id,
                    priority=request.priority,
                    deadline=deadline,
                )
            )
            return await ticket.next(Grant), ticket
        except BaseException:
            ctl.close(ticket)
            self._client_gone(request_id)
            raise

    def _deadline(self, context: Any) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self.controller.clock() + remaining

    def _lease(self, lease_id: str) -> Grant:
        lease = self.controller.state.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id!r} (expired or released)", reason="LEASE_NOT_FOUND")
        return Grant(
            lease.request_id, lease.model, lease.runtime_id, 0, lease.id, lease.expires_at, Tier.GPU
        )

    async def _proxy(self, grant: Grant, request: Any) -> AsyncIterator[Any]:
        worker = self.workers.worker(grant.runtime_id)
        if worker is None:
            raise Unavailable(f"the runtime of {grant.model} has no worker", reason="NO_WORKER")
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        forward = worker_pb2.WorkerGenerateRequest(sampling=sampling)
        prompt = request.WhichOneof("prompt")
        if prompt == "prompt_text":
            forward.prompt_text = request.prompt_text
        elif prompt == "prompt_chat":  # rendered by the worker, with the model's template
            forward.prompt_chat.CopyFrom(request.prompt_chat)
        else:
            forward.prompt_token_ids.CopyFrom(request.prompt_token_ids)
        self.controller.submit(RequestStarted(grant.model))
        try:
            call = worker.stub.Generate(forward)
            stream = self.calls.stream(grant.runtime_id, grant.model, call, worker.exited)
            async with contextlib.aclosing(stream) as chunks:  # untracked as soon as it ends
                async for chunk in chunks:
                    yield chunk
        finally:
            self.controller.submit(RequestFinished(grant.model))

    def _fill_usage(self, usage: Any, grant: Grant, t: _Times) -> None:
        """Timings as the client sees them, all counted from the request's arrival at torpord:
        waiting (queue, and the restore it waited for, if its runtime was not resident), the
        first token, the whole call."""
        waited = t.granted - t.start
        restore_s = 0.0
        if grant.restored_from is not Tier.GPU:  # it waited for a load or a resume
            restore_s = min(waited, self.workers.restore_seconds(grant.runtime_id))
        usage.timings.queued.CopyFrom(convert.duration(waited - restore_s))
        usage.timings.restore.CopyFrom(convert.duration(restore_s))
        usage.timings.first_token.CopyFrom(convert.duration(t.first - t.start))
        usage.timings.total.CopyFrom(convert.duration(t.end - t.start))
        usage.restored_from = int(grant.restored_from)  # type: ignore[assignment]
        usage.runtime_id = grant.runtime_id
        usage.gpu = grant.gpu

    # -- prefetch ---------------------------------------------------------------------------

    @aio_errors
    async def Prefetch(self, request: Any, context: Any) -> Any:
        ctl = self.controller
        validate.known_model(ctl.state.models, request.model)
        tier = convert.tier(request.tier, (Tier.GPU, Tier.HOST), "Prefetch tier")
        request_id = ctl.new_id("pre")
        ticket = ctl.open(request_id, request.model, progress=False)
        try:
            ctl.submit(PrefetchRequested(request_id, request.model, tier))
            if request.wait:
                done = await ticket.next(PrefetchDone)
                state = done.state
            else:
                state = ctl.state.runtime_of(request.model).state
        finally:
            ctl.close(ticket)
        if not (state.transitional or state is RuntimeState.FAILED):
            tier = state.tier  # where its weights are; else the tier it asked for
        return scheduler_pb2.PrefetchResponse(
            state=convert.state_name(state), tier=convert.tier_name(tier)
        )


@dataclass(frozen=True)
class _Times:
    """Moments of one Generate call, on the controller's clock."""

    start: float  # arrival at torpord
    granted: float  # its runtime is resident and leased to it
    first: float  # the first token came back
    end: float  # the last message
