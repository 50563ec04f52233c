"""Exchange swaps through a real torpord (issue 15), on the CPU backend: a device that holds
one of two models and a host budget that holds one copy, not two. Requests alternate between
them; every switch after the first trades places (Exchange: one runtime's weights to host
while the other's come back), the tokens of each model stay the same, no request fails, and
the host RAM the workers really hold stays within the budget.

The twin, at 8B-like proportions on the CPU, of the issue's GPU headline run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.daemon.conftest import MAX_SEQ_LEN, Torpord, call, start_torpord
from torpor.scheduler.footprint import estimate
from torpor.v1 import admin_pb2, common_pb2, worker_pb2, worker_pb2_grpc
from torpor.worker.engine.demo import DemoSpec, make_demo

MiB = 1 << 20
SPEC = DemoSpec(layers=6, hidden=512, heads=8, kv_heads=2, vocab=4096)  # about 80 MiB of weights
HANDLE = 2 * MiB  # the workers' arena handles, and so the exchange's slack
PROMPT = [5, 17, 33, 65, 129]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exchange-models")
    for seed, name in enumerate(("a", "b")):
        make_demo(root / name, DemoSpec(**{**SPEC.__dict__, "seed": seed + 7}))
    return root


@pytest.fixture
def daemon(tmp_path: Path, pair: Path) -> Iterator[Torpord]:
    fp = estimate(pair / "a", "float32", 4, MAX_SEQ_LEN, cuda=False)
    # One copy and the exchange's slack; not two copies. (No runtime keeps a copy at load:
    # that needs a restore's staging free beside it. The first suspend to host makes one.)
    host_budget = fp.weights + HANDLE + MiB
    assert host_budget < 2 * fp.weights
    d = start_torpord(
        tmp_path / "state",
        pair,
        memory=int(1.5 * fp.resident),  # the device holds one of the two
        TORPOR_BUDGETS_HOST_MEMORY=str(host_budget),
        TORPOR_WORKER_HANDLE_SIZE=str(HANDLE),
        TORPOR_STORE_CAPACITY="1MiB",  # no room for a snapshot: without exchanges, a drop
    )
    d.host_budget = host_budget  # type: ignore[attr-defined]
    for name in ("a", "b"):
        d.register(name, pair / name)
    yield d
    assert d.stop() == 0


def tokens(daemon: Torpord, model: str) -> tuple[list[int], int]:
    chunks = daemon.generate(model, PROMPT, max_tokens=12)
    return [t for c in chunks for t in c.token_ids], chunks[-1].usage.restored_from


def worker_host_bytes(daemon: Torpord) -> dict[str, int]:
    """Each worker's host bytes (its copy and staging), asked over its own socket."""
    held = {}
    for socket in sorted((daemon.state_dir / "run" / "workers").glob("*.sock")):
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            status = worker_pb2_grpc.WorkerStub(channel).Status(
                worker_pb2.WorkerStatusRequest(), timeout=30
            )
        held[status.model] = status.host_bytes + status.staging_bytes
    return held


def test_alternating_requests_trade_places_with_the_same_tokens(daemon: Torpord) -> None:
    want = {"b": tokens(daemon, "b")[0], "a": tokens(daemon, "a")[0]}
    a, b = daemon.runtime("a"), daemon.runtime("b")
    assert a.state == common_pb2.RUNTIME_STATE_RESIDENT and not a.host_copy  # no room for it
    assert b.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST and b.host_copy
    plan = call(daemon.admin.Explain, admin_pb2.ExplainRequest(model="b"))
    assert "exchange swap with a" in plan.reason and [v.exchange for v in plan.victims] == [True]

    for n, model in enumerate(["b", "a"] * 3):
        got, source = tokens(daemon, model)
        assert got == want[model], (n, model)
        assert source == common_pb2.TIER_HOST, (n, model)  # it came back from host RAM
        other = "a" if model == "b" else "b"
        here, there = daemon.runtime(model), daemon.runtime(other)
        assert here.state == common_pb2.RUNTIME_STATE_RESIDENT and not here.host_copy
        assert there.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST and there.host_copy
        residency = daemon.residency()
        assert residency.host.used_bytes <= daemon.host_budget  # type: ignore[attr-defined]
        held = worker_host_bytes(daemon)
        assert held[model] == 0 and 0 < held[other] <= there.host_bytes
        assert sum(held.values()) <= daemon.host_budget  # type: ignore[attr-defined]
