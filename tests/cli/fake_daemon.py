"""A fake torpord for the CLI's tests: a real gRPC server on a Unix socket that implements
Scheduler, Admin and the standard health service with canned but realistic answers.

Two simulated devices of 256 MiB; `demo-a` is resident on GPU 0, `demo-b` suspended to host
RAM on GPU 1, `demo-c` a snapshot with no worker, `huge` never fits. Errors are the typed
errors of torpor.errors, raised in the handlers and turned into statuses with ErrorInfo by
`torpor.rpc_status.servicer_errors` (`context.abort_with_status(to_status(err))`). Every
request is recorded, and a test waits for one with `wait_for(method)` (a condition, no
sleeps). The real daemon replaces this later; the tests stay the same.
"""

from __future__ import annotations

import threading
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from torpor.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from torpor.rpc_status import servicer_errors
from torpor.v1 import admin_pb2, admin_pb2_grpc, common_pb2, scheduler_pb2, scheduler_pb2_grpc

MiB = 1024**2
HOLD_LIMIT_S = 60.0  # a held stream ends by itself after this, so a broken test cannot hang
WORDS = ["Once", " upon", " a", " time", " a", " tiny", " model", " slept", " in", " host", " RAM"]
ACQUIRE = scheduler_pb2.AcquireEvent


def ts(when: datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(when)
    return t


def dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


class FakeTorpord:
    """The fake daemon: its state, its call log, and the gRPC server around it."""

    def __init__(self, socket: Path, lease_ttl_s: float = 60.0) -> None:
        self.socket = socket
        self.lease_ttl_s = lease_ttl_s
        self.renewable = True  # False: Renew answers NOT_FOUND, as for an expired lease
        self.wedged = False  # True: calls that wait never answer (a model stuck in a move)
        self.now = datetime.now(UTC)
        self.models = {m.spec.name: m for m in _models(self.now)}
        self.leases: dict[str, threading.Event] = {}  # lease id -> set when it ends
        self.calls: list[tuple[str, Any]] = []
        self._changed = threading.Condition()
        self.health = health.HealthServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(FakeScheduler(self), self._server)
        admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._server.add_insecure_port(f"unix:{socket}")

    def __enter__(self) -> FakeTorpord:
        self._server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for ended in self.leases.values():
            ended.set()
        self._server.stop(grace=None)

    def record(self, method: str, request: Any) -> None:
        with self._changed:
            self.calls.append((method, request))
            self._changed.notify_all()

    def requests(self, method: str) -> list[Any]:
        with self._changed:
            return [r for m, r in self.calls if m == method]

    def wait_for(self, method: str, count: int = 1, timeout: float = 30.0) -> list[Any]:
        """The first `count` requests of `method`, waiting for them up to `timeout`."""
        with self._changed:
            ok = self._changed.wait_for(lambda: len(self.requests(method)) >= count, timeout)
        assert ok, f"no {count}x {method} within {timeout} s; calls: {[m for m, _ in self.calls]}"
        return self.requests(method)[:count]

    def model(self, name: str) -> common_pb2.Model:
        if name not in self.models:
            raise NotFound(
                f"model {name!r} is not registered",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name},
            )
        return self.models[name]

    def lease(self, lease_id: str) -> threading.Event:
        ended = self.leases.get(lease_id)
        if ended is None or ended.is_set():
            raise NotFound(f"lease {lease_id!r} does not exist", reason="LEASE_NOT_FOUND")
        return ended


def _model(name: str, state: int, footprint: int, now: datetime, **spec: Any) -> common_pb2.Model:
    source = f"/var/lib/torpor/models/{name}"
    return common_pb2.Model(
        spec=common_pb2.ModelSpec(name=name, source=source, dtype=common_pb2.DTYPE_FLOAT32, **spec),
        registered_at=ts(now - timedelta(hours=1)),
        state=state,
        footprint_bytes=footprint,
        snapshot_id=f"snap-{name}",
    )


def _models(now: datetime) -> list[common_pb2.Model]:
    small, st = {"max_batch": 4, "max_seq_len": 512}, common_pb2
    return [
        _model("demo-a", st.RUNTIME_STATE_RESIDENT, 96 * MiB, now, keep_alive_s=300, **small),
        _model("demo-b", st.RUNTIME_STATE_SUSPENDED_HOST, 96 * MiB, now, pinned=True, **small),
        _model("demo-c", st.RUNTIME_STATE_SNAPSHOT, 96 * MiB, now, priority=5, **small),
        _model("huge", st.RUNTIME_STATE_COLD, 8192 * MiB, now),
    ]  # fmt: skip


def _runtimes(now: datetime) -> list[admin_pb2.RuntimeInfo]:
    info = admin_pb2.RuntimeInfo
    return [
        info(model="demo-a", runtime_id="rt-a0", state=common_pb2.RUNTIME_STATE_RESIDENT,
             tier=common_pb2.TIER_GPU, gpu=0, gpu_bytes=96 * MiB, host_bytes=90 * MiB,
             disk_bytes=88 * MiB, last_used=ts(now - timedelta(seconds=42)), leases=1,
             keep_alive_until=ts(now + timedelta(minutes=4)), restore_estimate=dur(0),
             worker_pid=4242),
        info(model="demo-b", runtime_id="rt-b1", state=common_pb2.RUNTIME_STATE_SUSPENDED_HOST,
             tier=common_pb2.TIER_HOST, gpu=1, gpu_bytes=6 * MiB, host_bytes=90 * MiB,
             last_used=ts(now - timedelta(minutes=10)), pinned=True,
             restore_estimate=dur(0.0123), worker_pid=4343),
        info(model="demo-c", runtime_id="rt-c", state=common_pb2.RUNTIME_STATE_SNAPSHOT,
             tier=common_pb2.TIER_DISK, disk_bytes=88 * MiB, restore_estimate=dur(0.84)),
    ]  # fmt: skip


def _gpus() -> list[admin_pb2.GpuInfo]:
    return [
        admin_pb2.GpuInfo(index=i, name="cpu", total_bytes=256 * MiB, used_bytes=used * MiB,
                          free_bytes=(256 - used) * MiB)
        for i, used in ((0, 96), (1, 6))
    ]  # fmt: skip


def _wedge(daemon: FakeTorpord, context: grpc.ServicerContext) -> None:
    """When the daemon is wedged: say nothing until the client gives up (or HOLD_LIMIT_S)."""
    if daemon.wedged:
        _hold(context, threading.Event())


def _hold(context: grpc.ServicerContext, ended: threading.Event) -> None:
    """Keep a stream open until `ended` is set or the client cancels the call."""
    context.add_callback(ended.set)
    ended.wait(HOLD_LIMIT_S)


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, daemon: FakeTorpord) -> None:
        self.d = daemon

    @servicer_errors
    def RegisterModel(self, request, context):
        self.d.record("RegisterModel", request)
        spec = request.spec
        if spec.name in self.d.models:
            raise AlreadyExists(f"model {spec.name!r} is already registered", reason="MODEL_EXISTS")
        if not spec.source.startswith("/"):
            raise InvalidArgument(f"source {spec.source!r} is not an absolute path")
        model = common_pb2.Model(
            spec=spec, registered_at=ts(datetime.now(UTC)), state=common_pb2.RUNTIME_STATE_COLD
        )
        self.d.models[spec.name] = model
        return scheduler_pb2.RegisterModelResponse(model=model)

    @servicer_errors
    def UnregisterModel(self, request, context):
        self.d.record("UnregisterModel", request)
        del self.d.models[self.d.model(request.name).spec.name]
        return scheduler_pb2.UnregisterModelResponse()

    @servicer_errors
    def GetModel(self, request, context):
        self.d.record("GetModel", request)
        return scheduler_pb2.GetModelResponse(model=self.d.model(request.name))

    @servicer_errors
    def ListModels(self, request, context):
        self.d.record("ListModels", request)
        return scheduler_pb2.ListModelsResponse(models=sorted(self.d.models.values(), key=_name))

    @servicer_errors
    def Acquire(self, request, context):
        self.d.record("Acquire", request)
        _wedge(self.d, context)
        model = self.d.model(request.model)
        if model.spec.name == "huge":
            raise FailedPrecondition(
                "huge needs 8.0 GiB; the largest GPU has 256.0 MiB", reason="NEVER_FITS"
            )
        yield ACQUIRE(queued=ACQUIRE.Queued(position=1, queue_depth=2))
        victim = common_pb2.Victim(
            model="demo-a",
            runtime_id="rt-a0",
            gpu=0,
            to_tier=common_pb2.TIER_HOST,
            bytes_freed=90 * MiB,
            score=0.5,
        )
        yield ACQUIRE(evicting=ACQUIRE.Evicting(victims=[victim]))
        for done in (0, 45 * MiB, 90 * MiB):
            yield ACQUIRE(
                restoring=common_pb2.TransferProgress(
                    tier=common_pb2.TIER_HOST, bytes_done=done, bytes_total=90 * MiB
                )
            )
        lease_id = f"lease-{len(self.d.leases) + 1}"
        ended = self.d.leases[lease_id] = threading.Event()
        expires = datetime.now(UTC) + timedelta(seconds=self.d.lease_ttl_s)
        yield ACQUIRE(
            ready=ACQUIRE.Ready(
                lease_id=lease_id,
                expires_at=ts(expires),
                gpu=0,
                worker_endpoint="unix:///run/torpor/workers/rt-a0.sock",
                runtime_id="rt-a0",
            )
        )
        _hold(context, ended)

    @servicer_errors
    def Renew(self, request, context):
        self.d.record("Renew", request)
        self.d.lease(request.lease_id)
        if not self.d.renewable:
            raise NotFound(f"lease {request.lease_id!r} expired", reason="LEASE_NOT_FOUND")
        expires = datetime.now(UTC) + timedelta(seconds=self.d.lease_ttl_s)
        return scheduler_pb2.RenewResponse(expires_at=ts(expires))

    @servicer_errors
    def Release(self, request, context):
        self.d.record("Release", request)
        self.d.lease(request.lease_id).set()
        return scheduler_pb2.ReleaseResponse()

    @servicer_errors
    def Generate(self, request, context):
        self.d.record("Generate", request)
        _wedge(self.d, context)
        model = self.d.model(request.model)
        s = request.sampling
        if not 0 <= s.temperature <= 100:
            raise InvalidArgument(
                f"temperature must be in [0, 100], got {s.temperature}",
                reason="INVALID_SAMPLING",
                metadata={"field": "temperature"},
            )
        n = min(s.max_tokens or len(WORDS), len(WORDS))
        for i in range(n):
            chunk = common_pb2.GenerateChunk(
                token_ids=[100 + i], text=WORDS[i], logprobs=[-0.1 * (i + 1)] if s.logprobs else []
            )
            if s.logprobs:
                top = [
                    common_pb2.TokenLogprob(
                        token_id=200 + k, logprob=-0.05 * (k + 1), token_bytes=b"\xe2" * (k + 1)
                    )
                    for k in range(s.top_logprobs)
                ]
                chosen = common_pb2.TokenLogprob(
                    token_id=100 + i, logprob=-0.1 * (i + 1), token_bytes=WORDS[i].encode()
                )
                chunk.token_logprobs.add(chosen=chosen, top=top)
            yield chunk
        finish = (
            common_pb2.FINISH_REASON_LENGTH if n == s.max_tokens else common_pb2.FINISH_REASON_STOP
        )
        timings = common_pb2.GenerateTimings(
            queued=dur(0.001), restore=dur(0.25), first_token=dur(0.26), total=dur(0.3)
        )
        tier = {"demo-a": common_pb2.TIER_GPU, "demo-b": common_pb2.TIER_HOST}
        yield common_pb2.GenerateChunk(
            usage=common_pb2.Usage(
                prompt_tokens=len(request.prompt_text.split()),
                completion_tokens=n,
                finish_reason=finish,
                timings=timings,
                runtime_id="rt-x",
                gpu=0,
                restored_from=tier.get(model.spec.name, common_pb2.TIER_DISK),
            )
        )

    @servicer_errors
    def Prefetch(self, request, context):
        self.d.record("Prefetch", request)
        _wedge(self.d, context)
        self.d.model(request.model)
        if request.tier not in (common_pb2.TIER_GPU, common_pb2.TIER_HOST):
            raise InvalidArgument("prefetch goes to GPU or HOST")
        state = {
            common_pb2.TIER_GPU: common_pb2.RUNTIME_STATE_RESIDENT,
            common_pb2.TIER_HOST: common_pb2.RUNTIME_STATE_SUSPENDED_HOST,
        }[request.tier]
        return scheduler_pb2.PrefetchResponse(state=state, tier=request.tier)


def _name(m: common_pb2.Model) -> str:
    return m.spec.name


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self, daemon: FakeTorpord) -> None:
        self.d = daemon

    @servicer_errors
    def ListResidency(self, request, context):
        self.d.record("ListResidency", request)
        runtimes = [r for r in _runtimes(self.d.now) if request.model in ("", r.model)]
        host = admin_pb2.MemoryBudget(
            total_bytes=1024 * MiB, used_bytes=180 * MiB, free_bytes=844 * MiB
        )
        return admin_pb2.ListResidencyResponse(gpus=_gpus(), runtimes=runtimes, host=host)

    @servicer_errors
    def Evict(self, request, context):
        self.d.record("Evict", request)
        _wedge(self.d, context)
        model = self.d.model(request.model)
        if model.spec.pinned:
            raise FailedPrecondition(f"{model.spec.name} is pinned", reason="PINNED")
        rid = "rt-a0"
        if request.mode != admin_pb2.EVICT_MODE_ABORT:
            yield admin_pb2.EvictResponse(runtime_id=rid, draining=1)
        for done in (0, 30 * MiB, 60 * MiB, 90 * MiB):
            yield admin_pb2.EvictResponse(
                runtime_id=rid,
                progress=common_pb2.TransferProgress(
                    tier=request.to_tier, bytes_done=done, bytes_total=90 * MiB
                ),
            )
        aborted = 2 if request.mode == admin_pb2.EVICT_MODE_ABORT else 0
        yield admin_pb2.EvictResponse(
            runtime_id=rid,
            done=admin_pb2.EvictResponse.Done(
                state=common_pb2.RUNTIME_STATE_SUSPENDED_HOST,
                gpu_bytes_freed=90 * MiB,
                aborted_requests=aborted,
                elapsed=dur(0.08),
            ),
        )

    @servicer_errors
    def SetPinned(self, request, context):
        self.d.record("SetPinned", request)
        model = self.d.model(request.model)
        model.spec.pinned = request.pinned
        return admin_pb2.SetPinnedResponse(model=model)

    @servicer_errors
    def Explain(self, request, context):
        self.d.record("Explain", request)
        model = self.d.model(request.model)
        if model.spec.name == "huge":
            return admin_pb2.ExplainResponse(
                admit=False,
                reason="needs 8.0 GiB; no GPU has it",
                reason_code="NEVER_FITS",
                source_tier=common_pb2.TIER_SOURCE,
                required_bytes=model.footprint_bytes,
            )
        victim = common_pb2.Victim(
            model="demo-a",
            runtime_id="rt-a0",
            gpu=0,
            to_tier=common_pb2.TIER_HOST,
            bytes_freed=90 * MiB,
            score=0.25,
        )
        return admin_pb2.ExplainResponse(
            admit=True,
            reason="fits on gpu 0 after evicting 1 runtime",
            reason_code="EVICT",
            gpu=0,
            victims=[victim],
            estimate=dur(0.84),
            source_tier=common_pb2.TIER_DISK,
            required_bytes=model.footprint_bytes,
        )

    @servicer_errors
    def WatchEvents(self, request, context):
        self.d.record("WatchEvents", request)
        for event in _events(self.d.now):
            if request.model in ("", event.model):
                yield event
        if request.follow:
            yield admin_pb2.Event(
                id=4,
                time=ts(datetime.now(UTC)),
                kind=admin_pb2.EVENT_KIND_LEASE_GRANTED,
                model="demo-a",
                gpu=0,
                detail="live: lease granted",
            )
            _hold(context, threading.Event())

    @servicer_errors
    def ListSnapshots(self, request, context):
        self.d.record("ListSnapshots", request)
        snaps = [
            admin_pb2.SnapshotInfo(
                snapshot_id=f"snap-{m}",
                model=m,
                state=admin_pb2.SNAPSHOT_STATE_COMPLETE,
                manifest_hash="ab12",
                fingerprint="cpu",
                bytes=88 * MiB,
                unique_bytes=80 * MiB,
                chunks=3,
                created_at=ts(self.d.now),
            )
            for m in ("demo-c", "demo-a")
        ]
        return admin_pb2.ListSnapshotsResponse(
            snapshots=[s for s in snaps if request.model in ("", s.model)]
        )

    @servicer_errors
    def DeleteSnapshot(self, request, context):
        self.d.record("DeleteSnapshot", request)
        if request.snapshot_id not in ("snap-demo-a", "snap-demo-c"):
            raise NotFound(
                f"snapshot {request.snapshot_id!r} does not exist", reason="SNAPSHOT_NOT_FOUND"
            )
        return admin_pb2.DeleteSnapshotResponse(bytes_freed=80 * MiB)

    @servicer_errors
    def CollectGarbage(self, request, context):
        self.d.record("CollectGarbage", request)
        return admin_pb2.CollectGarbageResponse(
            snapshots_deleted=1, chunks_deleted=7, bytes_freed=12 * MiB
        )

    @servicer_errors
    def GetStatus(self, request, context):
        self.d.record("GetStatus", request)
        return admin_pb2.GetStatusResponse(
            version="0.1.0",
            backend=admin_pb2.BACKEND_CPU,
            gpus=_gpus(),
            started_at=ts(self.d.now - timedelta(minutes=3)),
            uptime=dur(180),
            models=len(self.d.models),
            workers=2,
            hostname="fakehost",
        )


def _events(now: datetime) -> list[admin_pb2.Event]:
    event, ago = admin_pb2.Event, lambda minutes: ts(now - timedelta(minutes=minutes))
    return [
        event(id=1, time=ago(5), kind=admin_pb2.EVENT_KIND_MODEL_REGISTERED, model="demo-a",
              detail="registered demo-a"),
        event(id=2, time=ago(4), kind=admin_pb2.EVENT_KIND_STATE_CHANGED, model="demo-a",
              runtime_id="rt-a0", gpu=0, detail="cold -> resident",
              attributes={"from": "COLD", "to": "RESIDENT"}),
        event(id=3, time=ago(3), kind=admin_pb2.EVENT_KIND_EVICTION, model="demo-b",
              runtime_id="rt-b1", gpu=1, detail="evicted demo-b to host",
              attributes={"to_tier": "TIER_HOST", "bytes_freed": str(90 * MiB)}),
    ]  # fmt: skip
