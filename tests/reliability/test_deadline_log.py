"""A Generate whose deadline passes while torpord answers it must end quietly: torpord's log
holds no grpc `ExecuteBatchError` traceback (issue 12, found by test_load.py's
test_log_has_no_tracebacks: torpord ended such a call with its own DEADLINE_EXCEEDED at the
same moment as grpc's core ended it, and grpc logged the failed send with a traceback).

Streams with deadlines that pass while their model loads, waits in its queue or generates,
against three models on a device that holds two, a bounded number of times."""

from __future__ import annotations

import asyncio
from pathlib import Path
from random import Random

import grpc
import pytest

from tests.daemon.conftest import MODELS, footprint_bytes, start_torpord
from tests.reliability.faults import PROMPT
from torpor.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.reliability

ROUNDS = 6
STREAMS = 100
"""Per round; the deadlines are spread over the time a cold load and a queue take."""


async def _stream(stub: scheduler_pb2_grpc.SchedulerStub, model: str, deadline: float) -> str:
    request = scheduler_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True),
    )
    try:
        async for _ in stub.Generate(request, timeout=deadline):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def _rounds(socket: Path, rng: Random) -> list[str]:
    codes: list[str] = []
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for _ in range(ROUNDS):
            streams = [
                _stream(stub, rng.choice(MODELS), rng.uniform(0.01, 1.5)) for _ in range(STREAMS)
            ]
            codes += await asyncio.wait_for(asyncio.gather(*streams), 60)
    return codes


def test_deadlines_passing_while_torpord_answers_log_no_traceback(
    tmp_path: Path, model_root: Path
) -> None:
    log = tmp_path / "torpord.stderr"
    with log.open("w+b") as stderr:
        daemon = start_torpord(
            tmp_path / "state", model_root, int(2.5 * footprint_bytes(model_root)), stderr=stderr
        )
        try:
            for name in MODELS:
                daemon.register(name, model_root / name)
            codes = asyncio.run(_rounds(daemon.socket, Random(12)))
        finally:
            assert daemon.stop() == 0
    text = log.read_text(errors="replace")
    assert "DEADLINE_EXCEEDED" in codes  # the deadlines did pass while torpord answered
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, codes
    assert "Traceback" not in text, text[text.find("Traceback") - 300 :][:3000]
