"""Dummy weights (`load_format dummy`): the filler that generates a model's weights from a
seed of its name, into the placed tensors a checkpoint would fill."""

from __future__ import annotations

import torch

from torpor.worker.engine.dummy import DummyFiller, seed_for
from torpor.worker.engine.layout import DevicePlacement, Layout
from torpor.worker.engine.model_config import ModelConfig
from torpor.worker.engine.weights import weight_plan, weight_specs

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],  # q/k/v biases too
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _fill(model: str, fp8: bool) -> dict[str, torch.Tensor]:
    plan = weight_plan(ModelConfig.from_dict(CONFIG), fp8_weights=fp8)
    layout = Layout.plan("weights", weight_specs(plan, torch.float32))
    tensors = DevicePlacement("cpu").place(layout)
    done: list[int] = []
    DummyFiller(seed_for(model)).fill(plan, tensors, done.append)
    assert done[-1] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def test_the_seed_is_stable_and_the_weights_deterministic() -> None:
    assert seed_for("llama3:70b") == seed_for("llama3:70b") != seed_for("llama3:8b")
    assert 0 <= seed_for("x") < 1 << 62
    a, b, other = _fill("m", False), _fill("m", False), _fill("n", False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.wqkv"], other["layers.0.wqkv"])


def test_norms_are_one_biases_zero_matrices_random() -> None:
    w = _fill("m", False)
    assert torch.all(w["layers.1.attn_norm"] == 1) and torch.all(w["norm"] == 1)
    assert torch.all(w["layers.0.bqkv"] == 0)
    wqkv = w["layers.0.wqkv"]
    assert 0.05 < float(wqkv.std()) < 0.3  # about 1/sqrt(64)
    assert torch.isfinite(w["lm_head"]).all()


def test_fp8_weights_get_data_and_row_scales() -> None:
    w = _fill("m", True)
    assert w["layers.0.w13"].dtype == torch.float8_e4m3fn
    data = w["layers.0.w13"].float()
    assert torch.isfinite(data).all() and float(data.std()) > 0.5
    scale = w["layers.0.w13.scale"]
    assert scale.shape == (w["layers.0.w13"].shape[0],) and bool((scale > 0).all())
    assert w["embed"].dtype == torch.float32  # the embedding stays unquantized


def test_a_pre_quantized_config_gets_fp8_where_it_publishes_fp8() -> None:
    """A dummy model of an FP8 checkpoint's config.json: in an fp8 runtime its quantized
    linears are fp8 data with a scale per row, the head it ignores is unquantized; in any
    other dtype everything is dense, as its dequantized checkpoint would load."""
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"FP8_DYNAMIC": ["Linear"]},  # a preset by name, as some publish
        "ignore": ["lm_head"],
    }
    cfg = ModelConfig.from_dict({**CONFIG, "quantization_config": quant})
    plan = weight_plan(cfg, fp8_weights=True)
    tensors = DevicePlacement("cpu").place(
        Layout.plan("weights", weight_specs(plan, torch.bfloat16))
    )
    DummyFiller(seed_for("m")).fill(plan, tensors, None)
    wqkv, scale = tensors["layers.1.wqkv"], tensors["layers.1.wqkv.scale"]
    assert wqkv.dtype == torch.float8_e4m3fn and scale.shape == (wqkv.shape[0],)
    assert float(wqkv.float().std()) > 0.5 and bool((scale > 0).all())
    assert tensors["lm_head"].dtype == torch.bfloat16 and "lm_head.scale" not in tensors
    assert torch.isfinite(tensors["lm_head"].float()).all()
    dense = weight_specs(weight_plan(cfg, fp8_weights=False), torch.float32)
    assert {s.dtype for s in dense} == {torch.float32}
