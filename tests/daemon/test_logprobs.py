"""Log-probabilities, token bytes and top alternatives arrive through torpord's
Scheduler.Generate exactly as the worker produced them (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.conftest import Torpord, call
from torpor.errors import InvalidArgument
from torpor.v1 import common_pb2, scheduler_pb2
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest
from torpor.worker.engine.sampling import SamplingParams

PROMPT = "Pages move from the device to the host"


def test_token_logprobs_pass_through_generate(torpord: Torpord, model_root: Path) -> None:
    request = scheduler_pb2.GenerateRequest(
        model="alpha",
        prompt_text=PROMPT,
        sampling=common_pb2.SamplingParams(
            max_tokens=10, temperature=0.8, seed=5, ignore_eos=True, logprobs=True, top_logprobs=4
        ),
    )
    chunks = call(torpord.scheduler.Generate, request, timeout=120)
    assert chunks[-1].HasField("usage")

    engine = Engine.load(model_root / "alpha", EngineOptions(max_batch=1, max_seq_len=256))
    params = SamplingParams(
        max_tokens=10, temperature=0.8, seed=5, ignore_eos=True, logprobs=True, top_logprobs=4
    )
    (expected,) = engine.generate_all(
        [GenerationRequest("x", tuple(engine.encode(PROMPT)), params)]
    )
    tokenizer = engine.tokenizer
    assert tokenizer is not None

    entries = [e for c in chunks for e in c.token_logprobs]
    assert [t for c in chunks for t in c.token_ids] == list(expected.token_ids)
    assert [e.chosen.token_id for e in entries] == list(expected.token_ids)
    assert [e.chosen.logprob for e in entries] == [lp for c in chunks for lp in c.logprobs]
    assert [e.chosen.logprob for e in entries] == pytest.approx(list(expected.logprobs), abs=1e-4)
    for entry, top in zip(entries, expected.top_logprobs, strict=True):
        assert [t.token_id for t in entry.top] == [t for t, _ in top]
        assert [t.logprob for t in entry.top] == pytest.approx([lp for _, lp in top], abs=1e-4)
        assert [t.token_bytes for t in entry.top] == [tokenizer.token_bytes(t) for t, _ in top]
        assert entry.chosen.token_bytes == tokenizer.token_bytes(entry.chosen.token_id)

    # Not asked: neither field, and a top without logprobs is refused before it queues.
    plain = torpord.generate("alpha", [1, 2, 3], max_tokens=4)
    assert all(not c.logprobs and not c.token_logprobs for c in plain)
    bad = scheduler_pb2.GenerateRequest(
        model="alpha",
        prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=common_pb2.SamplingParams(max_tokens=2, top_logprobs=1),
    )
    with pytest.raises(InvalidArgument) as info:
        call(torpord.scheduler.Generate, bad)
    assert info.value.reason == "INVALID_SAMPLING"
    assert info.value.metadata["field"] == "top_logprobs"
