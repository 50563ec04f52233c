"""What torpor refuses of pre-quantized checkpoints (issue 15), and how: every quantization
it does not load is InvalidArgument, reason UNSUPPORTED_QUANTIZATION, naming the method and
scheme, both where the engine loads (`Engine.load`) and where torpord registers
(`scheduler/footprint.py`, read by the registry before anything is admitted); every published
fp8 tensor that is not what config.json says is CHECKPOINT_MISMATCH naming the tensor."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine import checkpoints
from torpor.errors import InvalidArgument
from torpor.scheduler import footprint
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.model_config import ModelConfig
from torpor.worker.engine.options import EngineOptions

UNSUPPORTED = "UNSUPPORTED_QUANTIZATION"
OPTIONS = EngineOptions(max_seq_len=64, dtype="float32")


def _variant(src: Path, out: Path, edit_config: Any = None, edit_tensors: Any = None) -> Path:
    """A copy of checkpoint `src` with config.json's quantization_config and/or its tensors
    changed in place by the given functions."""
    shutil.copytree(src, out)
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config["quantization_config"])
        (out / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        state = load_file(str(out / "model.safetensors"))
        edit_tensors(state)
        save_file(state, str(out / "model.safetensors"))
    return out


def _refused_everywhere(model_dir: Path, reason: str) -> str:
    """The message of the refusal, the same at load and at registration."""
    errors = []
    for attempt in (
        lambda: Engine.load(model_dir, OPTIONS),
        lambda: footprint.checkpoint_dtype(model_dir, cuda=True),
        lambda: footprint.estimate(model_dir, "fp8", 1, 64, cuda=True),
    ):
        with pytest.raises(InvalidArgument) as info:
            attempt()
        assert info.value.reason == reason
        errors.append(str(info.value))
    assert len(set(errors)) == 1, errors
    return errors[0]


def _group(**weights: object) -> dict[str, Any]:
    scheme = copy.deepcopy(checkpoints.FP8_DYNAMIC)
    scheme["weights"].update(weights)
    return {"group_0": {"targets": ["Linear"], **scheme}}


@pytest.mark.parametrize(
    ("quant", "named"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "'gptq'"),
        ({"quant_method": "awq", "bits": 4}, "'awq'"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "'bitsandbytes'"),
        # The block-wise fp8 of Qwen's and DeepSeek's releases.
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "'fp8'"),
    ],
)
def test_another_method_is_refused_naming_it(
    fp8_checkpoints: dict[str, Path], tmp_path: Path, quant: dict[str, Any], named: str
) -> None:
    def replace(q: dict[str, Any]) -> None:
        q.clear()
        q.update(quant)

    model = _variant(fp8_checkpoints["llama_ct_dynamic"], tmp_path / "m", replace)
    message = _refused_everywhere(model, UNSUPPORTED)
    assert f"quant_method {named} is not supported" in message


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_group(strategy="block", block_structure=[128, 128]), "block"),
        (_group(strategy="group", group_size=128), "strategy 'group'"),
        (_group(type="int"), "8-bit int"),  # int8 weights (W8A8 int)
        (_group(num_bits=4, type="int", strategy="group", group_size=128), "4-bit int"),
        (_group(symmetric=False), "asymmetric"),
    ],
)
def test_a_compressed_tensors_scheme_other_than_fp8_per_channel_or_tensor_is_refused(
    fp8_checkpoints: dict[str, Path], tmp_path: Path, edit: dict[str, Any], named: str
) -> None:
    model = _variant(
        fp8_checkpoints["llama_ct_dynamic"], tmp_path / "m", lambda q: q.update(config_groups=edit)
    )
    message = _refused_everywhere(model, UNSUPPORTED)
    assert "compressed-tensors" in message and named in message


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"format": "pack-quantized"}, "format 'pack-quantized'"),
        ({"format": "int-quantized"}, "format 'int-quantized'"),
        ({"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme"),
        (
            {"config_groups": {"FP8_BLOCK": ["Linear"]}},  # a preset by name
            "preset scheme 'FP8_BLOCK'",
        ),
        (
            {"config_groups": {"g": {"targets": ["LlamaAttention"], **checkpoints.FP8_DYNAMIC}}},
            "target 'LlamaAttention'",
        ),
    ],
)
def test_other_compressed_tensors_forms_are_refused(
    fp8_checkpoints: dict[str, Path], tmp_path: Path, edit: dict[str, Any], named: str
) -> None:
    model = _variant(fp8_checkpoints["llama_ct_dynamic"], tmp_path / "m", lambda q: q.update(edit))
    assert named in _refused_everywhere(model, UNSUPPORTED)


def test_activations_per_group_are_refused(
    fp8_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    def edit(q: dict[str, Any]) -> None:
        acts = q["config_groups"]["group_0"]["input_activations"]
        acts.update(strategy="group", group_size=128)

    model = _variant(fp8_checkpoints["llama_ct_dynamic"], tmp_path / "m", edit)
    assert "input activations use strategy 'group'" in _refused_everywhere(model, UNSUPPORTED)


def test_a_fused_tensor_half_quantized_is_refused(
    fp8_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """q/k/v become one engine tensor: a checkpoint quantizing q_proj alone cannot load."""
    model = _variant(
        fp8_checkpoints["llama_ct_dynamic"],
        tmp_path / "m",
        lambda q: q.update(ignore=["lm_head", "re:.*k_proj", "re:.*v_proj"]),
    )
    message = _refused_everywhere(model, UNSUPPORTED)
    assert "model.layers.0.self_attn.q_proj but not model.layers.0.self_attn.k_proj" in message


def test_a_quantized_tied_head_is_refused(fp8_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = _variant(
        fp8_checkpoints["qwen2_ct_dynamic"], tmp_path / "m", lambda q: q.update(ignore=[])
    )
    assert "quantizes lm_head, which is tied" in _refused_everywhere(model, UNSUPPORTED)


def test_malformed_quantization_config_is_bad_config() -> None:
    base = json.loads(json.dumps(_LLAMA))
    for quant in ("fp8", {"quant_method": "compressed-tensors", "config_groups": []}):
        with pytest.raises(InvalidArgument) as info:
            ModelConfig.from_dict({**base, "quantization_config": quant})
        assert info.value.reason == "BAD_CONFIG" and "quantization_config" in str(info.value)


_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


# -- published tensors that do not match config.json: refused at load -----------------------

Q = "model.layers.1.self_attn.q_proj"


def _mismatch(model_dir: Path) -> str:
    with pytest.raises(InvalidArgument) as info:
        Engine.load(model_dir, OPTIONS)
    assert info.value.reason == "CHECKPOINT_MISMATCH"
    return str(info.value)


def test_a_missing_weight_scale(fp8_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = _variant(
        fp8_checkpoints["llama_ct_dynamic"],
        tmp_path / "m",
        edit_tensors=lambda s: s.pop(Q + ".weight_scale"),
    )
    assert f"missing {Q}.weight_scale (compressed-tensors (float-quantized))" in _mismatch(model)


@pytest.mark.parametrize(
    ("name", "shape"), [("llama_ct_dynamic", (96, 2)), ("llama_ct_static", (2,))]
)
def test_a_scale_of_the_wrong_shape(
    fp8_checkpoints: dict[str, Path], tmp_path: Path, name: str, shape: tuple[int, ...]
) -> None:
    """Per channel it must be [N, 1] (or [N]); per tensor [1] (or a scalar)."""

    def edit(state: dict[str, torch.Tensor]) -> None:
        state[Q + ".weight_scale"] = torch.ones(shape)

    model = _variant(fp8_checkpoints[name], tmp_path / "m", edit_tensors=edit)
    message = _mismatch(model)
    assert f"{Q}.weight_scale is F32 {list(shape)}, expected float" in message
    assert "compressed-tensors" in message


def test_a_weight_that_is_not_e4m3(fp8_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[Q + ".weight"] = state[Q + ".weight"].to(torch.bfloat16)

    model = _variant(fp8_checkpoints["llama_fbgemm"], tmp_path / "m", edit_tensors=edit)
    assert f"{Q}.weight is BF16, expected F8_E4M3 (fbgemm_fp8 (per-row))" in _mismatch(model)


def test_a_static_scheme_without_its_input_scale(
    fp8_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    model = _variant(
        fp8_checkpoints["llama_ct_static"],
        tmp_path / "m",
        edit_tensors=lambda s: s.pop(Q + ".input_scale"),
    )
    assert f"missing {Q}.input_scale" in _mismatch(model)


def test_an_fp8_weight_the_config_leaves_unquantized(
    fp8_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The published lm_head is e4m3 but config.json ignores it: its bytes are no weights
    without the scale, so the load stops instead of reading them as values."""
    model = _variant(
        fp8_checkpoints["llama_ct_static"], tmp_path / "m", lambda q: q.update(ignore=["lm_head"])
    )
    message = _mismatch(model)
    assert "lm_head.weight is F8_E4M3, but config.json does not quantize it" in message
    assert "unexpected lm_head.weight_scale" in message


# -- what is accepted, from config.json alone -------------------------------------------------


def _parse(quant: dict[str, Any], tied: bool = False) -> Any:
    return ModelConfig.from_dict(
        {**_LLAMA, "tie_word_embeddings": tied, "quantization_config": quant}
    ).quantization


def test_naive_quantized_is_read_when_it_holds_float8_only() -> None:
    quant = {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized",
        "config_groups": {"FP8": ["Linear"]},  # per tensor, static activations
    }
    parsed = _parse(quant)
    scheme = parsed.scheme("model.layers.1.mlp.down_proj")
    assert scheme is not None and not scheme.per_row and scheme.static_input
    assert parsed.scheme("lm_head") is not None  # nothing ignored
    quant["config_groups"] = _group(type="int")
    with pytest.raises(InvalidArgument) as info:
        _parse(quant)
    assert info.value.reason == UNSUPPORTED and "8-bit int" in str(info.value)


def test_fbgemm_keeps_the_head_unless_its_list_says_otherwise() -> None:
    """transformers' rule: without modules_to_not_convert the LM head is not converted; with
    one, the list decides. Entries are prefixes at a module boundary, or regexes."""
    assert _parse({"quant_method": "fbgemm_fp8"}).scheme("lm_head") is None
    listed = _parse({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["model.layers.1"]})
    assert listed.scheme("lm_head") is not None
    assert listed.scheme("model.layers.1.mlp.up_proj") is None
    assert listed.scheme("model.layers.0.mlp.up_proj") is not None
    regex = _parse({"quant_method": "fbgemm_fp8", "modules_to_not_convert": [r".*\.o_proj"]})
    assert regex.scheme("model.layers.0.self_attn.o_proj") is None
    assert regex.scheme("lm_head") is not None
