"""The footprint estimate torpord prices a model at before its worker measures it."""

from __future__ import annotations

import pytest


def test_staging_is_four_chunks_at_most_and_no_larger_than_the_weights() -> None:
    """The host bytes torpord counts for a runtime's staging buffers (and sends the worker as
    its limit): four disk-ring chunks of at most 64 MiB, or on CUDA the deep resume's stager
    when that is larger; a small model's buffers are no larger than its weights."""
    from torpor.scheduler.footprint import staging_bytes

    mib = 1 << 20
    assert staging_bytes(140 << 30, cuda=True) == 4 * 64 * mib  # a 70B model: 256 MiB
    assert staging_bytes(140 << 30, cuda=False) == 4 * 64 * mib
    assert staging_bytes(3 * mib, cuda=False) == 4 * 4 * mib  # 2 MiB-aligned pieces
    assert staging_bytes(3 * mib, cuda=True) == 14 * 4 * mib  # the stager's 14 buffers


def test_a_snapshot_write_stages_one_chunk_on_cuda_and_nothing_on_cpu(tmp_path) -> None:
    from torpor.scheduler.footprint import estimate
    from torpor.worker.engine.demo import DemoSpec, make_demo

    model = make_demo(tmp_path / "m", DemoSpec(layers=2, hidden=128, vocab=512))
    on_cpu = estimate(model, "float32", 4, 256, cuda=False)
    on_cuda = estimate(model, "float32", 4, 256, cuda=True)
    assert on_cpu.write_staging == 0
    assert 0 < on_cuda.write_staging <= on_cuda.staging
    assert on_cuda.write_staging >= on_cuda.weights  # one buffer holds the largest piece


def _dummy_copy(model, to):
    """The same model without its weights: config.json and the tokenizer only."""
    import shutil

    shutil.copytree(model, to)
    for shard in to.glob("*.safetensors"):
        shard.unlink()
    return to


def test_a_dummy_models_estimate_equals_that_of_its_config_with_real_weights(tmp_path) -> None:
    """A dummy model (load_format dummy) has no safetensors: its tensors' shapes come from
    config.json, and every part of its estimate equals the checkpoint's, for every dtype."""
    import dataclasses

    from torpor.errors import InvalidArgument
    from torpor.scheduler.footprint import estimate
    from torpor.worker.engine.demo import DemoSpec, make_demo

    model = make_demo(tmp_path / "m", DemoSpec(layers=3, hidden=128, vocab=512))
    dummy = _dummy_copy(model, tmp_path / "d")
    for dtype in ("float32", "bfloat16", "float16", "fp8"):
        for cuda in (False, True):
            real = estimate(model, dtype, 4, 256, cuda=cuda)
            assert estimate(dummy, dtype, 4, 256, cuda=cuda, dummy=True) == real
            assert dataclasses.asdict(real)["weights"] > 0
    with pytest.raises(InvalidArgument) as info:  # without dummy, it needs its safetensors
        estimate(dummy, "float32", 4, 256, cuda=False)
    assert info.value.reason == "CHECKPOINT_INCOMPLETE"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tie_word_embeddings": True},
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
        {"attention_bias": True, "mlp_bias": True},
        {"num_key_value_heads": 4, "head_dim": 64},
    ],
)
def test_a_dummy_models_tensors_are_the_engines_weight_plan(extra) -> None:
    """torpord (no torch) computes a dummy model's tensors from config.json; they are exactly
    the checkpoint tensors the engine's weight plan fills, name and shape."""
    from torpor.scheduler.footprint import config_shapes
    from torpor.worker.engine.model_config import ModelConfig
    from torpor.worker.engine.weights import weight_plan

    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **extra,
    }
    plan = weight_plan(ModelConfig.from_dict(config), fp8_weights=False)
    expected = {p.name: list(p.shape) for src in plan for p in src.parts}
    assert config_shapes(config) == expected
