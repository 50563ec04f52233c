"""A pre-quantized fp8 checkpoint on a GPU (issue 15): the engine runs it as published, in
fp8 (auto picks it), and picks the greedy tokens of its dequantized reference (the same
checkpoint loaded as bfloat16). Skipped where there is no GPU; the same check runs on the
CPU in test_fp8_checkpoints.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.test_fp8_checkpoints import STEPS, TEXTS, greedy_agreement
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions

pytestmark = pytest.mark.gpu


def test_an_fp8_checkpoint_runs_as_published_and_picks_the_references_tokens(
    fp8_checkpoints: dict[str, Path],
) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    model_dir = fp8_checkpoints["demo_ct_dynamic"]  # compressed-tensors, lm_head ignored
    fp8 = Engine.load(model_dir, EngineOptions(device="cuda", max_seq_len=256))
    ref = Engine.load(model_dir, EngineOptions(device="cuda", max_seq_len=256, dtype="bfloat16"))
    assert fp8.memory.dtype == "fp8" and ref.memory.dtype == "bfloat16"
    weights = fp8.memory.weight_tensors
    assert weights["layers.0.wqkv"].dtype == torch.float8_e4m3fn
    assert weights["lm_head"].dtype == torch.bfloat16 and "lm_head.scale" not in weights

    results = [greedy_agreement(fp8.model, ref.model, ref.encode(t), STEPS) for t in TEXTS]
    checked, agreed = (sum(r) for r in zip(*results, strict=True))
    assert checked >= 16 and agreed == checked
