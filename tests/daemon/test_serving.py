"""torpord serving many clients across more models than fit, on the CPU backend."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.daemon.conftest import MODELS, Torpord
from torpor.v1 import common_pb2
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest
from torpor.worker.engine.sampling import SamplingParams


def prompt(i: int) -> list[int]:
    return [3 + (i * 7 + k * 13) % 400 for k in range(5 + i % 6)]


def expected_tokens(
    model_root: Path, requests: list[tuple[str, list[int]]]
) -> dict[int, list[int]]:
    """What each request gives when its model runs it alone (float32, greedy)."""
    engines = {
        m: Engine.load(model_root / m, EngineOptions(max_batch=1, max_seq_len=256)) for m in MODELS
    }
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = {}
    for i, (model, ids) in enumerate(requests):
        (result,) = engines[model].generate_all([GenerationRequest(str(i), tuple(ids), params)])
        out[i] = list(result.token_ids)
    return out


def test_thirty_clients_across_three_models(torpord: Torpord, model_root: Path) -> None:
    requests = [(MODELS[i % 3], prompt(i)) for i in range(30)]
    expected = expected_tokens(model_root, requests)
    over_budget: list[str] = []
    done = threading.Event()

    def watch() -> None:  # the device's budget is never exceeded, at any moment we look
        while not done.is_set():
            for gpu in torpord.residency().gpus:
                if gpu.used_bytes > gpu.total_bytes:
                    over_budget.append(f"{gpu.used_bytes} > {gpu.total_bytes}")
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(30) as pool:
            results = list(pool.map(lambda r: torpord.generate(*r), requests))
    finally:
        done.set()
        watcher.join()
    for i, chunks in enumerate(results):
        assert [t for c in chunks for t in c.token_ids] == expected[i], (
            f"request {i} ({requests[i][0]})"
        )
        assert chunks[-1].usage.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert over_budget == []
    # Three models on a device for two: someone was evicted (and served again later).
    kinds = [e.kind for e in _events(torpord)]
    assert kinds.count(4) >= 1  # EVENT_KIND_EVICTION


def _events(torpord: Torpord) -> list:
    from tests.daemon.conftest import call
    from torpor.v1 import admin_pb2

    return call(torpord.admin.WatchEvents, admin_pb2.WatchEventsRequest(after_id=0))


def test_evicted_model_comes_back_from_host(torpord: Torpord) -> None:
    first = torpord.generate("alpha", prompt(1))
    torpord.generate("beta", prompt(2))
    torpord.generate("gamma", prompt(3))  # the device holds two: alpha (least recent) goes down
    assert torpord.runtime("alpha").state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
    again = torpord.generate("alpha", prompt(1))
    assert [t for c in again for t in c.token_ids] == [t for c in first for t in c.token_ids]
    assert again[-1].usage.restored_from == common_pb2.TIER_HOST
    assert first[-1].usage.restored_from == common_pb2.TIER_SOURCE


@pytest.mark.parametrize("tier", [common_pb2.TIER_DISK, common_pb2.TIER_DROP])
def test_operator_evicts_and_the_next_request_restores(torpord: Torpord, tier: int) -> None:
    from tests.daemon.conftest import call
    from torpor.v1 import admin_pb2

    first = torpord.generate("beta", prompt(4))
    replies = call(torpord.admin.Evict, admin_pb2.EvictRequest(model="beta", to_tier=tier))
    assert replies[-1].HasField("done")
    assert replies[-1].done.gpu_bytes_freed > 0
    state = torpord.runtime("beta").state
    assert state in (
        common_pb2.RUNTIME_STATE_SUSPENDED_DISK,
        common_pb2.RUNTIME_STATE_SNAPSHOT,
        common_pb2.RUNTIME_STATE_COLD,
    )
    again = torpord.generate("beta", prompt(4))
    assert [t for c in again for t in c.token_ids] == [t for c in first for t in c.token_ids]
