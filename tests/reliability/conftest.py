"""Fixtures of the reliability suites: the daemon tests' demo models, and reference tokens
computed in-process (independent of torpord) for the correctness checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.conftest import MAX_SEQ_LEN, MODELS, model_root
from tests.reliability.faults import CHECK_TOKENS, PROMPT

__all__ = ["model_root", "reference_tokens"]


@pytest.fixture(scope="session")
def reference_tokens(model_root: Path) -> dict[str, list[int]]:
    """Greedy tokens of PROMPT per model, from the engine run alone in this process."""
    from torpor.worker.engine.engine import Engine
    from torpor.worker.engine.options import EngineOptions
    from torpor.worker.engine.requests import GenerationRequest
    from torpor.worker.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=CHECK_TOKENS, temperature=0, ignore_eos=True)
    out = {}
    for name in MODELS:
        engine = Engine.load(model_root / name, EngineOptions(max_batch=1, max_seq_len=MAX_SEQ_LEN))
        (result,) = engine.generate_all([GenerationRequest(name, tuple(PROMPT), params)])
        out[name] = list(result.token_ids)
    return out
