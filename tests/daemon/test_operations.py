"""Operator verbs and the daemon's surroundings: prefetch, pin, drain, evict with ABORT,
TCP, systemd readiness, metrics."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.daemon.conftest import MODELS, Torpord, call, footprint_bytes, start_torpord
from tests.helpers import assert_eventually
from torpor.errors import Aborted
from torpor.rpc_status import from_rpc_error
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2


def test_prefetch_to_host_then_gpu(torpord: Torpord) -> None:
    reply = call(
        torpord.scheduler.Prefetch,
        scheduler_pb2.PrefetchRequest(model="alpha", tier=common_pb2.TIER_HOST, wait=True),
    )
    assert reply.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
    assert torpord.runtime("alpha").host_bytes > 0
    reply = call(
        torpord.scheduler.Prefetch,
        scheduler_pb2.PrefetchRequest(model="alpha", tier=common_pb2.TIER_GPU, wait=True),
    )
    assert reply.state == common_pb2.RUNTIME_STATE_RESIDENT
    chunks = torpord.generate("alpha", [1, 2, 3])
    assert chunks[-1].usage.restored_from == common_pb2.TIER_GPU  # it was already there


def test_pinned_model_is_not_evicted(torpord: Torpord) -> None:
    torpord.generate("alpha", [1, 2])
    call(torpord.admin.SetPinned, admin_pb2.SetPinnedRequest(model="alpha", pinned=True))
    torpord.generate("beta", [1, 2])
    torpord.generate("gamma", [1, 2])
    assert torpord.runtime("alpha").state == common_pb2.RUNTIME_STATE_RESIDENT
    assert torpord.runtime("alpha").pinned
    with pytest.raises(Exception, match="pinned"):
        call(
            torpord.admin.Evict, admin_pb2.EvictRequest(model="alpha", to_tier=common_pb2.TIER_HOST)
        )
    call(torpord.admin.SetPinned, admin_pb2.SetPinnedRequest(model="alpha", pinned=False))
    call(torpord.admin.Evict, admin_pb2.EvictRequest(model="alpha", to_tier=common_pb2.TIER_HOST))
    assert torpord.runtime("alpha").state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST


def test_evict_with_abort_ends_running_requests(torpord: Torpord) -> None:
    torpord.generate("alpha", [1, 2])
    request = scheduler_pb2.GenerateRequest(
        model="alpha",
        prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=common_pb2.SamplingParams(max_tokens=240, temperature=0, ignore_eos=True),
    )
    stream = torpord.scheduler.Generate(request, timeout=60)
    next(stream)
    done = call(
        torpord.admin.Evict,
        admin_pb2.EvictRequest(
            model="alpha", to_tier=common_pb2.TIER_HOST, mode=admin_pb2.EVICT_MODE_ABORT
        ),
    )
    assert done[-1].done.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert isinstance(from_rpc_error(info.value), Aborted)


def test_drain_empties_a_gpu_and_undrain_fills_it(torpord: Torpord) -> None:
    torpord.generate("alpha", [1, 2])
    reply = call(torpord.admin.Drain, admin_pb2.DrainRequest(gpu=0, to_tier=common_pb2.TIER_HOST))
    assert reply.gpu.draining
    assert_eventually(
        lambda: torpord.runtime("alpha").state,
        lambda s: s == common_pb2.RUNTIME_STATE_SUSPENDED_HOST,
    )
    with pytest.raises(Exception, match="draining"):
        torpord.generate("beta", [1, 2])
    reply = call(torpord.admin.Drain, admin_pb2.DrainRequest(gpu=0, undrain=True))
    assert not reply.gpu.draining
    torpord.generate("beta", [1, 2])


def test_tcp_readiness_and_metrics(tmp_path: Path, model_root: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    port, metrics = _free_port(), _free_port()
    torpord = start_torpord(
        tmp_path / "s",
        model_root,
        int(2.5 * footprint_bytes(model_root)),
        metrics_port=metrics,
        NOTIFY_SOCKET=str(tmp_path / "notify"),
        TORPOR_DAEMON_LISTEN=f"127.0.0.1:{port}",
        TORPOR_DAEMON_TCP_AUTH="false",  # tokens and TLS: tests/security/test_tcp_auth.py
    )
    try:
        assert b"READY=1" in notify.recv(4096)  # systemd is told once the socket serves
        with grpc.insecure_channel(f"127.0.0.1:{port}") as tcp:
            health = health_pb2_grpc.HealthStub(tcp).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        torpord.register(MODELS[0], model_root / MODELS[0])
        torpord.generate(MODELS[0], [1, 2, 3])
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert 'torpor_runtimes{state="resident"} 1.0' in text
        assert "torpor_load_duration_seconds_bucket" in text
        assert 'torpor_hits_total{tier="cold"} 1.0' in text
        assert oct(torpord.socket.stat().st_mode & 0o777) == "0o660"
    finally:
        assert torpord.stop() == 0
        notify.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_watch_events_follows_live(torpord: Torpord) -> None:
    seen: list[admin_pb2.Event] = []
    got = threading.Event()
    stream = torpord.admin.WatchEvents(
        admin_pb2.WatchEventsRequest(follow=True, kinds=[admin_pb2.EVENT_KIND_LEASE_GRANTED])
    )

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # CANCELLED when the test is done
            for event in stream:
                seen.append(event)
                got.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    torpord.generate("gamma", [4, 5])
    assert got.wait(30)
    stream.cancel()
    assert seen[0].model == "gamma" and seen[0].kind == admin_pb2.EVENT_KIND_LEASE_GRANTED


def test_reflection_lists_the_services(torpord: Torpord) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(torpord.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"torpor.v1.Scheduler", "torpor.v1.Admin", "grpc.health.v1.Health"} <= names
    # A client with no .proto files can fetch the API's descriptors (what grpcurl does).
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="torpor.v1.Admin")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert reply.file_descriptor_response.file_descriptor_proto
