"""Leases, queues, deadlines, impossible models, crashed workers and restarts, through a real
torpord and real workers."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tests.daemon.conftest import MODELS, Torpord, call, footprint_bytes, start_torpord
from tests.helpers import assert_eventually
from torpor.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from torpor.rpc_status import from_rpc_error
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2


class Lease:
    """An Acquire stream held open on a thread (the lease lives as long as the stream)."""

    def __init__(self, torpord: Torpord, model: str, **request: object) -> None:
        self.call = torpord.scheduler.Acquire(scheduler_pb2.AcquireRequest(model=model, **request))
        self.events: list[scheduler_pb2.AcquireEvent] = []
        self.error: Exception | None = None
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
                if event.HasField("ready"):
                    self.ready.set()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = from_rpc_error(exc)
        finally:
            self.ready.set()
            self.ended.set()

    def wait_ready(self) -> scheduler_pb2.AcquireEvent.Ready:
        assert self.ready.wait(60)
        if self.error is not None:
            raise self.error
        return self.events[-1].ready

    def cancel(self) -> None:
        self.call.cancel()
        assert self.ended.wait(30)


def test_leased_runtime_is_never_evicted(torpord: Torpord) -> None:
    lease = Lease(torpord, "alpha")
    ready = lease.wait_ready()
    assert ready.lease_id and ready.worker_endpoint.startswith("unix://")
    assert any(e.HasField("loading") for e in lease.events)  # a cold load reports progress
    torpord.generate("beta", [5, 6, 7])
    torpord.generate("gamma", [5, 6, 7])  # room for gamma comes from beta, not leased alpha
    assert torpord.runtime("alpha").state == common_pb2.RUNTIME_STATE_RESIDENT
    assert torpord.runtime("alpha").leases == 1
    assert torpord.runtime("beta").state != common_pb2.RUNTIME_STATE_RESIDENT
    # Generate through the lease: no queueing, same runtime.
    chunks = call(
        torpord.scheduler.Generate,
        scheduler_pb2.GenerateRequest(
            lease_id=ready.lease_id,
            prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
            sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0),
        ),
    )
    assert chunks[-1].usage.runtime_id == ready.runtime_id
    lease.cancel()  # a client that goes away loses its lease
    assert_eventually(lambda: torpord.runtime("alpha").leases, lambda n: n == 0)
    torpord.generate("beta", [5, 6, 7])  # and alpha may now be evicted
    assert torpord.runtime("alpha").state != common_pb2.RUNTIME_STATE_RESIDENT


def test_lease_expires_unless_renewed(torpord: Torpord) -> None:
    ttl = Duration(seconds=1)
    lease = Lease(torpord, "alpha", lease_ttl=ttl)
    ready = lease.wait_ready()
    renewed = call(
        torpord.scheduler.Renew,
        scheduler_pb2.RenewRequest(lease_id=ready.lease_id, ttl=Duration(seconds=2)),
    )
    assert renewed.expires_at.ToNanoseconds() > ready.expires_at.ToNanoseconds()
    assert lease.ended.wait(30)  # the stream ends when the lease expires
    assert torpord.runtime("alpha").leases == 0
    with pytest.raises(NotFound):
        call(torpord.scheduler.Renew, scheduler_pb2.RenewRequest(lease_id=ready.lease_id))
    with pytest.raises(NotFound):
        call(torpord.scheduler.Release, scheduler_pb2.ReleaseRequest(lease_id=ready.lease_id))


def test_queue_bound_and_deadline(tmp_path: Path, model_root: Path) -> None:
    torpord = start_torpord(
        tmp_path / "s",
        model_root,
        int(2.5 * footprint_bytes(model_root)),
        TORPOR_POLICY_QUEUE_BOUND="1",
    )
    try:
        for name in MODELS:
            torpord.register(name, model_root / name)
        held = [Lease(torpord, "alpha"), Lease(torpord, "beta")]
        for lease in held:
            lease.wait_ready()
        # gamma cannot get room while both others are leased: it waits in its queue.
        deadline = Timestamp()
        deadline.GetCurrentTime()
        deadline.FromNanoseconds(deadline.ToNanoseconds() + 2_000_000_000)
        waiting = Lease(torpord, "gamma", deadline=deadline)
        assert_eventually(
            lambda: [e.WhichOneof("event") for e in waiting.events], lambda k: "queued" in k
        )
        with pytest.raises(ResourceExhausted):  # the queue holds one
            Lease(torpord, "gamma").wait_ready()
        with pytest.raises(DeadlineExceeded):
            waiting.wait_ready()
        for lease in held:
            lease.cancel()
        assert Lease(torpord, "gamma").wait_ready().lease_id  # room again
    finally:
        assert torpord.stop() == 0


def test_model_that_can_never_fit_fails_at_once(tmp_path: Path, model_root: Path) -> None:
    torpord = start_torpord(tmp_path / "s", model_root, 16 << 20)
    try:
        big = torpord.register("big", model_root / "alpha", max_batch=64)  # KV of 64 slots
        assert big.footprint_bytes > 16 << 20
        with pytest.raises(FailedPrecondition, match="can never fit"):
            torpord.generate("big", [1, 2, 3])
        explained = call(torpord.admin.Explain, admin_pb2.ExplainRequest(model="big"))
        assert not explained.admit and explained.reason_code == "NEVER_FITS"
    finally:
        assert torpord.stop() == 0


def test_killed_worker_fails_its_request_and_recovers(torpord: Torpord) -> None:
    torpord.generate("alpha", [1, 2, 3])
    pid = torpord.runtime("alpha").worker_pid
    request = scheduler_pb2.GenerateRequest(
        model="alpha",
        prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=common_pb2.SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
    )
    stream = torpord.scheduler.Generate(request, timeout=60)
    next(stream)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert isinstance(from_rpc_error(info.value), Unavailable)
    assert_eventually(lambda: torpord.runtime("alpha").worker_pid, lambda p: p != pid)
    chunks = torpord.generate("alpha", [1, 2, 3])  # the next request succeeds
    assert chunks[-1].usage.completion_tokens == 8


def test_restart_keeps_models_and_restores_from_snapshot(
    torpord: Torpord, model_root: Path
) -> None:
    first = torpord.generate("gamma", [9, 8, 7])
    call(torpord.admin.Evict, admin_pb2.EvictRequest(model="gamma", to_tier=common_pb2.TIER_DISK))
    snapshots = call(
        torpord.admin.ListSnapshots, admin_pb2.ListSnapshotsRequest(model="gamma")
    ).snapshots
    assert len(snapshots) == 1 and snapshots[0].state == admin_pb2.SNAPSHOT_STATE_COMPLETE
    assert torpord.stop() == 0
    again = start_torpord(torpord.state_dir, model_root, int(2.5 * footprint_bytes(model_root)))
    torpord.proc, torpord.channel = again.proc, again.channel  # the fixture stops this one
    models = call(again.scheduler.ListModels, scheduler_pb2.ListModelsRequest()).models
    assert [m.spec.name for m in models] == sorted(MODELS)
    assert next(m for m in models if m.spec.name == "gamma").snapshot_id == snapshots[0].snapshot_id
    assert again.runtime("gamma").state == common_pb2.RUNTIME_STATE_SNAPSHOT
    restored = again.generate("gamma", [9, 8, 7])
    assert restored[-1].usage.restored_from == common_pb2.TIER_DISK
    assert [t for c in restored for t in c.token_ids] == [t for c in first for t in c.token_ids]


def test_bad_requests_get_their_codes(torpord: Torpord, model_root: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        torpord.generate("nope", [1])
    with pytest.raises(InvalidArgument, match="model name"):
        torpord.register("../etc", model_root / "alpha")
    with pytest.raises(InvalidArgument, match="model root"):
        torpord.register("outside", tmp_path)
    with pytest.raises(InvalidArgument, match="temperature"):
        call(
            torpord.scheduler.Generate,
            scheduler_pb2.GenerateRequest(
                model="alpha",
                prompt_token_ids=common_pb2.TokenIds(ids=[1]),
                sampling=common_pb2.SamplingParams(temperature=-1),
            ),
        )
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        call(torpord.scheduler.Generate, scheduler_pb2.GenerateRequest(model="alpha"))
    with pytest.raises(InvalidArgument):
        call(
            torpord.admin.Evict, admin_pb2.EvictRequest(model="alpha", to_tier=common_pb2.TIER_GPU)
        )
    from torpor.errors import AlreadyExists

    with pytest.raises(AlreadyExists):
        torpord.register("alpha", model_root / "alpha")


def test_lease_holder_hears_of_a_dead_worker(torpord: Torpord) -> None:
    lease = Lease(torpord, "beta")
    lease.wait_ready()
    os.kill(torpord.runtime("beta").worker_pid, signal.SIGKILL)
    assert lease.ended.wait(30)  # never left hanging
    assert isinstance(lease.error, Unavailable)
    assert_eventually(lambda: torpord.runtime("beta").leases, lambda n: n == 0)
    assert torpord.generate("beta", [1, 2])[-1].usage.completion_tokens == 8  # recovered
