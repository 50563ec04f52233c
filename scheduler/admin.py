"""`torpor.v1.Admin`: the operators' service (asyncio): residency, evictions, pins, plans,
events, snapshots, draining and status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torpor import __version__
from torpor.errors import FailedPrecondition, NotFound, Unavailable
from torpor.rpc_status import aio_servicer_errors as aio_errors
from torpor.scheduler import convert, event_log, labels, validate
from torpor.scheduler.core import (
    DrainRequested,
    DrainStarted,
    EvictFinished,
    EvictMode,
    EvictRequested,
    RuntimeState,
    SnapshotDeleted,
    Tier,
    snapshot_in_use,
)
from torpor.scheduler.residency import ResidencyView
from torpor.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from torpor.scheduler.controller import Controller
    from torpor.scheduler.event_log import EventLog
    from torpor.scheduler.inflight import InflightCalls
    from torpor.scheduler.registry import LatestSnapshots, ModelRegistry
    from torpor.store.snapshots import SnapshotStore

_EVICT_TIERS = (Tier.HOST, Tier.DEEP, Tier.DISK, Tier.DROP)


@dataclass(frozen=True)
class DaemonInfo:
    """What GetStatus says of torpord itself."""

    started_at: float  # time.time() at start
    cuda: bool
    hostname: str


class AdminService(admin_pb2_grpc.AdminServicer):
    """Each collaborator is the one owner of what it is asked about."""

    def __init__(
        self,
        *,
        controller: Controller,
        models: ModelRegistry,
        residency: ResidencyView,
        calls: InflightCalls,
        events: EventLog,
        snapshots: SnapshotStore,
        recorder: LatestSnapshots,
        info: DaemonInfo,
    ) -> None:
        self.controller = controller
        self.models = models
        self.residency = residency
        self.calls = calls
        self.events = events
        self.snapshots = snapshots
        self.recorder = recorder
        self.info = info

    @aio_errors
    async def ListResidency(self, request: Any, context: Any) -> Any:
        reply = admin_pb2.ListResidencyResponse(gpus=self.residency.gpus())
        reply.runtimes.extend(self.residency.runtimes(request.model, request.include_cold))
        host_used, disk_used = self.residency.tier_usage()
        state = self.controller.state
        reply.host.CopyFrom(
            admin_pb2.MemoryBudget(
                total_bytes=state.host_budget,
                used_bytes=host_used,
                free_bytes=max(0, state.host_budget - host_used),
            )
        )
        reply.disk.CopyFrom(
            admin_pb2.MemoryBudget(
                total_bytes=state.disk_budget,
                used_bytes=disk_used,
                free_bytes=max(0, state.disk_budget - disk_used),
            )
        )
        return reply

    @aio_errors
    async def Evict(self, request: Any, context: Any) -> AsyncIterator[Any]:
        validate.required(request.model, "model")
        to_tier = convert.tier(request.to_tier, _EVICT_TIERS, "to_tier")
        mode, timeout = _drain_options(request)
        ctl = self.controller
        model = validate.known_model(ctl.state.models, request.model)
        if request.runtime_id and request.runtime_id != model.runtime_id:
            raise NotFound(
                f"model {request.model!r} has no runtime {request.runtime_id!r}",
                reason="RUNTIME_NOT_FOUND",
                metadata={"model": request.model, "runtime_id": request.runtime_id},
            )
        request_id = ctl.new_id("evict")
        ticket = ctl.open(request_id, request.model, progress=False)
        start = time.perf_counter()
        try:
            runtime = (
                ctl.state.runtime_of(request.model) if request.model in ctl.state.models else None
            )
            before = ctl.state.held(runtime).gpu_bytes if runtime is not None else 0
            ctl.submit(EvictRequested(request_id, request.model, to_tier, mode, timeout))
            if runtime is not None and (ctl.state.leases_on(runtime.id) or runtime.inflight):
                yield admin_pb2.EvictResponse(
                    runtime_id=runtime.id, draining=ctl.state.leases_on(runtime.id)
                )
            done = await ticket.next(EvictFinished)
            if done.error is not None:
                raise done.error
            if done.state is RuntimeState.FAILED:
                raise Unavailable(
                    f"evicting {done.model} failed: its worker failed and was stopped; the next "
                    "request loads it again",
                    reason="EVICTION_FAILED",
                )
            yield admin_pb2.EvictResponse(
                runtime_id=done.runtime_id,
                done=admin_pb2.EvictResponse.Done(
                    state=convert.state_name(done.state),
                    gpu_bytes_freed=max(0, before - self._gpu_bytes(done.runtime_id)),
                    aborted_requests=self.calls.take_aborted(done.runtime_id),
                    elapsed=convert.duration(time.perf_counter() - start),
                ),
            )
            self.events.append(
                "eviction",
                model=done.model,
                runtime=done.runtime_id,
                to=labels.TIER_LABELS[to_tier],
                by="operator",
            )
        finally:
            ctl.close(ticket)

    def _gpu_bytes(self, runtime_id: str) -> int:
        runtime = self.controller.state.runtimes.get(runtime_id)
        return self.controller.state.held(runtime).gpu_bytes if runtime is not None else 0

    @aio_errors
    async def SetPinned(self, request: Any, context: Any) -> Any:
        validate.required(request.model, "model")
        model = await self.models.set_pinned(request.model, request.pinned)
        return admin_pb2.SetPinnedResponse(model=model)

    @aio_errors
    async def Explain(self, request: Any, context: Any) -> Any:
        validate.required(request.model, "model")
        validate.priority(request.priority)
        return convert.explain(self.controller.explain(request.model, request.priority))

    @aio_errors
    async def WatchEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        descriptor = admin_pb2.EventKind.DESCRIPTOR
        kinds = frozenset(
            convert.event_kind_name(validate.enum(k, descriptor, "kinds"))
            for k in request.kinds
            if k != admin_pb2.EVENT_KIND_UNSPECIFIED  # ignored in a filter, as documented
        )
        flt = event_log.Filter(
            kinds, request.model, request.gpu if request.HasField("gpu") else None
        )
        after = validate.event_id(request.after_id)
        if request.WhichOneof("start") == "since":
            since = validate.timestamp(request.since, "since")
            after = await asyncio.to_thread(self.events.first_id_since, since)
        elif request.WhichOneof("start") is None and request.follow:
            after = await asyncio.to_thread(self.events.last_id)  # live only
        async for event in self.events.watch(flt, after, request.follow):
            yield event_log.message(event)

    @aio_errors
    async def ListSnapshots(self, request: Any, context: Any) -> Any:
        def listing() -> list[admin_pb2.SnapshotInfo]:
            infos = self.snapshots.list(request.model or None, include_corrupt=True)
            return [_snapshot(i, self.snapshots.details(i.id)) for i in infos]

        return admin_pb2.ListSnapshotsResponse(snapshots=await asyncio.to_thread(listing))

    @aio_errors
    async def DeleteSnapshot(self, request: Any, context: Any) -> Any:
        validate.required(request.snapshot_id, "snapshot_id", "SNAPSHOT_REQUIRED")
        info = await asyncio.to_thread(self.snapshots.get, request.snapshot_id)
        if (
            self.recorder.latest.get(info.model) == info.id
            and info.model in self.controller.state.models
        ):
            if snapshot_in_use(self.controller.state, info.model):
                raise FailedPrecondition(
                    f"snapshot {info.id} holds {info.model}'s only copy of its weights",
                    reason="SNAPSHOT_IN_USE",
                )
            # In one step of the loop, with no await between: the core stops counting it as
            # the runtime's, and its bytes count as outside until the store has removed them
            # (the disk ledger never drops below what is on disk, docs/POLICY.md).
            self.controller.submit(SnapshotDeleted(info.model))
            self.recorder.untrack(info.model, info.total_bytes)
        try:
            report = await asyncio.to_thread(self.snapshots.delete, request.snapshot_id)
        finally:
            await self.recorder.measure_outside()
        self.events.append("snapshot_deleted", model=info.model, snapshot=info.id)
        return admin_pb2.DeleteSnapshotResponse(bytes_freed=report.bytes_freed)

    @aio_errors
    async def CollectGarbage(self, request: Any, context: Any) -> Any:
        report = await asyncio.to_thread(self.snapshots.collect_garbage, dry_run=request.dry_run)
        return admin_pb2.CollectGarbageResponse(
            chunks_deleted=report.chunks_removed, bytes_freed=report.bytes_freed
        )

    @aio_errors
    async def Drain(self, request: Any, context: Any) -> Any:
        to_tier = convert.tier(request.to_tier or int(Tier.HOST), _EVICT_TIERS, "to_tier")
        mode, timeout = _drain_options(request)
        ctl = self.controller
        request_id = ctl.new_id("drain")
        ticket = ctl.open(request_id, "", progress=False)
        try:
            ctl.submit(
                DrainRequested(
                    request_id,
                    request.gpu,
                    to_tier,
                    mode,
                    timeout,
                    undrain=request.undrain,
                )
            )
            started = await ticket.next(DrainStarted) if not request.undrain else None
        finally:
            ctl.close(ticket)
        self.events.append("gpu_draining_changed", gpu=request.gpu, draining=not request.undrain)
        reply = admin_pb2.DrainResponse()
        for info in self.residency.gpus():
            if info.index == request.gpu:
                reply.gpu.CopyFrom(info)
        if started is not None:
            for rid in started.runtime_ids:
                runtime = ctl.state.runtimes.get(rid)
                reply.evicted.add(
                    model=runtime.model if runtime else "",
                    runtime_id=rid,
                    gpu=request.gpu,
                    to_tier=int(to_tier),
                )
        return reply

    @aio_errors
    async def GetStatus(self, request: Any, context: Any) -> Any:
        state = self.controller.state
        workers = sum(1 for r in state.runtimes.values() if r.state in _WITH_WORKER)
        return admin_pb2.GetStatusResponse(
            version=__version__,
            backend=admin_pb2.BACKEND_CUDA if self.info.cuda else admin_pb2.BACKEND_CPU,
            gpus=self.residency.gpus(),
            started_at=convert.timestamp(self.info.started_at),
            uptime=convert.duration(time.time() - self.info.started_at),
            models=len(state.models),
            workers=workers,
            hostname=self.info.hostname,
        )


def _drain_options(request: Any) -> tuple[EvictMode, float | None]:
    """The mode and drain timeout of an Evict or Drain request, checked."""
    mode = validate.enum(request.mode, admin_pb2.EvictMode.DESCRIPTOR, "mode")
    timeout = None
    if request.HasField("drain_timeout"):
        timeout = validate.duration(
            request.drain_timeout, "drain_timeout", validate.DRAIN_TIMEOUT_S
        )
    return convert.evict_mode(mode), timeout


_WITH_WORKER = {
    RuntimeState.RESIDENT,
    RuntimeState.SUSPENDED_HOST,
    RuntimeState.SUSPENDED_DEEP,
    RuntimeState.SUSPENDED_DISK,
    RuntimeState.LOADING,
    RuntimeState.SUSPENDING,
    RuntimeState.RESUMING,
}


def _snapshot(info: Any, details: Any) -> admin_pb2.SnapshotInfo:
    return admin_pb2.SnapshotInfo(
        snapshot_id=info.id,
        model=info.model,
        state=convert.snapshot_state(info.state),
        manifest_hash=str(details.manifest.get("manifest_hash", "")),
        fingerprint=info.fingerprint,
        bytes=info.total_bytes,
        unique_bytes=details.unique_bytes,
        chunks=details.chunks,
        created_at=convert.timestamp(info.created_at),
        last_used=convert.timestamp(info.last_used_at),
    )
