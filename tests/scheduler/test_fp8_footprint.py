"""What torpord makes of a pre-quantized fp8 checkpoint at registration (issue 15), without
torch: the dtype a registration without one gets, and the bytes its runtime will hold, for
the checkpoint and for its config.json alone (`--load-format dummy`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.engine import checkpoints
from torpor.scheduler.footprint import checkpoint_dtype, estimate
from torpor.worker.engine.demo import DemoSpec, make_demo
from torpor.worker.engine.layout import Layout
from torpor.worker.engine.model_config import ModelConfig
from torpor.worker.engine.weights import weight_plan, weight_specs

DTYPES = {"fp8": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DYNAMIC = {"group_0": {"targets": ["Linear"], **checkpoints.FP8_DYNAMIC}}
STATIC = {"group_0": {"targets": ["Linear"], **checkpoints.FP8_STATIC}}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8-footprint")
    plain = make_demo(root / "plain", DemoSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=384))
    return {
        "plain": plain,
        "ct": checkpoints.compressed_tensors(plain, root / "ct", DYNAMIC),  # lm_head ignored
        "ct_head": checkpoints.compressed_tensors(plain, root / "ct_head", STATIC, ignore=()),
        "fbgemm": checkpoints.fbgemm_fp8(plain, root / "fbgemm", ("model.layers.1.mlp",)),
    }


def _layout_bytes(model: Path, dtype: str) -> int:
    """The bytes of the weights arena the engine will place for this checkpoint."""
    plan = weight_plan(ModelConfig.from_dir(model), fp8_weights=dtype == "fp8")
    return Layout.plan("weights", weight_specs(plan, DTYPES[dtype])).nbytes


@pytest.mark.parametrize("name", ["ct", "ct_head", "fbgemm"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_estimate_covers_the_engines_weights_as_for_a_plain_checkpoint(
    models: dict[str, Path], name: str, dtype: str
) -> None:
    """The estimate exceeds the arena the engine places by an alignment's slack, the same
    slack as for the plain checkpoint (scales are no tensors of their own in it)."""
    slack = estimate(models["plain"], dtype, 1, 64, cuda=False).weights - _layout_bytes(
        models["plain"], dtype
    )
    got = estimate(models[name], dtype, 1, 64, cuda=False).weights
    assert got - _layout_bytes(models[name], dtype) == slack
    assert 0 < slack < 256 * 32


def test_an_ignored_head_stays_bfloat16_in_an_fp8_runtime(models: dict[str, Path]) -> None:
    vocab, hidden = 384, 64
    ignored = estimate(models["ct"], "fp8", 1, 64, cuda=True).weights
    quantized = estimate(models["ct_head"], "fp8", 1, 64, cuda=True).weights
    assert ignored - quantized == 2 * vocab * hidden - (vocab * hidden + 4 * vocab)
    # And the plain checkpoint in fp8 quantizes its head at load, as ct_head publishes it.
    assert estimate(models["plain"], "fp8", 1, 64, cuda=True).weights == quantized


@pytest.mark.parametrize("name", ["ct", "ct_head", "fbgemm"])
def test_a_dummy_fp8_models_estimate_equals_its_checkpoints(
    models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    dummy = tmp_path / "dummy"
    shutil.copytree(models[name], dummy, ignore=shutil.ignore_patterns("*.safetensors"))
    for dtype in DTYPES:
        for cuda in (False, True):
            real = estimate(models[name], dtype, 4, 64, cuda=cuda)
            assert estimate(dummy, dtype, 4, 64, cuda=cuda, dummy=True) == real


def test_a_registration_without_a_dtype_gets_fp8_on_cuda(models: dict[str, Path]) -> None:
    """As published on a GPU; on the CPU backend, the checkpoint's declared dtype, into which
    the worker dequantizes it."""
    for name in ("ct", "fbgemm"):
        assert checkpoint_dtype(models[name], cuda=True) == "fp8"
        assert checkpoint_dtype(models[name], cuda=False) == "float32"  # config.json's dtype
    assert checkpoint_dtype(models["plain"], cuda=True) == "float32"
