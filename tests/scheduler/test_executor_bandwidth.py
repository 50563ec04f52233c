"""Which resumes teach the policy a bandwidth: a streamed resume returns while its copy still
runs, so its seconds are not the copy's; a deep resume copies through staging buffers, a path
of its own. Neither may be folded into the host-to-GPU bandwidth."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from torpor.scheduler.core import Tier
from torpor.scheduler.core.actions import Resume
from torpor.scheduler.core.lifecycle import RuntimeState
from torpor.scheduler.executor import Executor
from torpor.v1 import common_pb2, worker_pb2


class Recorded:
    def __init__(self) -> None:
        self.bandwidths: list[tuple[Tier, int, float]] = []

    async def bandwidth(self, tier: Tier, nbytes: int, seconds: float) -> None:
        self.bandwidths.append((tier, nbytes, seconds))


def _executor(streamed: bool, tier: int) -> tuple[Executor, Recorded]:
    async def resume_stream(_: Any) -> Any:
        yield worker_pb2.WorkerResumeResponse(
            done=worker_pb2.WorkerResumeResponse.Done(tier=tier, bytes=10**9, streamed=streamed)
        )

    worker = SimpleNamespace(
        stub=SimpleNamespace(Resume=resume_stream), exited=asyncio.Event(), returncode=None
    )
    supervisor = SimpleNamespace(workers={"m#1": worker})
    recorded = Recorded()
    executor = Executor(
        supervisor,  # type: ignore[arg-type]
        defaults=SimpleNamespace(transition_timeout_s=30.0),  # type: ignore[arg-type]
        models={},
        report=lambda _: None,
        progress=lambda *_: None,
        snapshots=recorded,
    )
    return executor, recorded


@pytest.mark.parametrize(
    ("streamed", "recorded_bandwidths"), [(False, 1), (True, 0)], ids=["copy-first", "streamed"]
)
def test_only_a_resume_that_waited_for_its_copy_is_a_bandwidth(
    streamed: bool, recorded_bandwidths: int
) -> None:
    executor, recorded = _executor(streamed, common_pb2.TIER_HOST)
    action = Resume("m#1", "m", 1, Tier.HOST, RuntimeState.RESIDENT, keep_host_copy=True)
    asyncio.run(executor._resume(action))
    assert len(recorded.bandwidths) == recorded_bandwidths
    if recorded_bandwidths:
        assert recorded.bandwidths[0][:2] == (Tier.HOST, 10**9)


def test_a_deep_resume_is_not_folded_into_the_host_bandwidth() -> None:
    from torpor.scheduler.core.world import Costs
    from torpor.scheduler.recorder import Recorder

    class Catalog:
        def __init__(self) -> None:
            self.recorded: list[Any] = []

        def record_bandwidth(self, host: str, tier: Any, nbytes: int, seconds: float) -> Any:
            self.recorded.append(tier)
            return SimpleNamespace(bytes_per_s=nbytes / seconds)

    catalog = Catalog()
    updates: list[Costs] = []
    recorder = Recorder(catalog, None, Costs, updates.append)  # type: ignore[arg-type]
    asyncio.run(recorder.bandwidth(Tier.DEEP, 10**9, 0.05))
    assert catalog.recorded == [] and updates == []
    asyncio.run(recorder.bandwidth(Tier.HOST, 55 * 10**9, 1.0))
    assert [t.value for t in catalog.recorded] == ["host_to_gpu"]
    assert updates[-1].host_to_gpu == 55e9
