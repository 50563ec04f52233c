"""Prefetch(HOST) of a disk-suspended model through a real torpord (issue 13): the worker reads
the snapshot straight into its host copy in one Resume, maps no arena, and ends
SUSPENDED_HOST, whatever host copy its load was given."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.daemon.conftest import MAX_SEQ_LEN, Torpord, call, start_torpord
from torpor.scheduler.footprint import estimate
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from torpor.worker.engine.demo import DemoSpec, make_demo

MiB = 1 << 20
SPEC = DemoSpec(layers=4, hidden=384, heads=6, kv_heads=2, vocab=3072)  # 33 MiB of weights


@pytest.fixture(scope="module")
def big_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefetch-models")
    for seed, name in enumerate(("a", "b")):
        make_demo(root / name, DemoSpec(**{**SPEC.__dict__, "seed": seed}))
    return root


@pytest.fixture
def daemon(tmp_path: Path, big_models: Path) -> Iterator[Torpord]:
    fp = estimate(big_models / "a", "float32", 4, MAX_SEQ_LEN, cuda=False)
    # One model's copy and the room a restore's staging keeps free (a loaded runtime keeps a
    # copy only with that room left: docs/POLICY.md "Staging buffers"), not two copies.
    host_budget = fp.weights + fp.staging + MiB
    assert host_budget < 2 * fp.weights + fp.staging
    d = start_torpord(
        tmp_path / "state",
        big_models,
        memory=int(2.5 * fp.resident),
        TORPOR_BUDGETS_HOST_MEMORY=str(host_budget),
    )
    for name in ("a", "b"):
        d.register(name, big_models / name)
    yield d
    assert d.stop() == 0


def worker_status(daemon: Torpord, model: str) -> worker_pb2.WorkerStatusResponse:
    """The model's worker, asked directly over its socket: what the process really holds."""
    for socket in sorted((daemon.state_dir / "run" / "workers").glob("*.sock")):
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            status = worker_pb2_grpc.WorkerStub(channel).Status(
                worker_pb2.WorkerStatusRequest(), timeout=30
            )
        if status.model == model:
            return status
    raise AssertionError(f"no worker serves {model}")


def test_prefetch_to_host_of_a_disk_suspended_model(daemon: Torpord) -> None:
    daemon.generate("a", [1, 2])
    assert daemon.runtime("a").host_bytes > 0  # a took the host budget for its copy
    expected = [t for c in daemon.generate("b", [1, 2, 3, 4]) for t in c.token_ids]
    assert daemon.runtime("b").host_bytes == 0  # no room: b was loaded without a copy
    assert worker_status(daemon, "b").host_bytes == 0

    for model, tier in (("b", common_pb2.TIER_DISK), ("a", common_pb2.TIER_DROP)):
        call(daemon.admin.Evict, admin_pb2.EvictRequest(model=model, to_tier=tier))
    assert daemon.runtime("b").state == common_pb2.RUNTIME_STATE_SUSPENDED_DISK

    reply = call(
        daemon.scheduler.Prefetch,
        scheduler_pb2.PrefetchRequest(model="b", tier=common_pb2.TIER_HOST, wait=True),
        timeout=120,
    )
    assert reply.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
    info = daemon.runtime("b")
    assert info.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
    assert info.gpu_bytes == 0  # context + residue: none on the CPU backend
    assert info.host_bytes > 0  # the weights' copy, counted
    worker = worker_status(daemon, "b")
    assert worker.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
    assert 0 < worker.host_bytes <= info.host_bytes  # really held, within what the ledger counts
    assert worker.peak_mapped_bytes == 0  # the snapshot never went through an arena
    assert all(a.mapped_bytes == 0 for a in worker.arenas)

    chunks = daemon.generate("b", [1, 2, 3, 4])
    assert chunks[-1].usage.restored_from == common_pb2.TIER_HOST
    assert [t for c in chunks for t in c.token_ids] == expected
