"""Random-weight checkpoints written by transformers' own model classes and save_pretrained."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch


def _save(model_cls, config, out: Path, max_shard_size: str | None = None) -> Path:
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # transformers' init is too flat to tell bugs apart
            p.copy_(
                torch.randn_like(p) * (0.5 if p.dim() > 1 else 0.2) + (1.0 if p.dim() == 1 else 0)
            )
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def llama_gqa_llama3(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(LlamaForCausalLM, config, out)


def mistral(out: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        sliding_window=24,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(MistralForCausalLM, config, out)


def qwen2_tied(out: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=310,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(Qwen2ForCausalLM, config, out)


def llama_sharded(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(LlamaForCausalLM, config, out, max_shard_size="100KB")


def to_old_config_layout(model_dir: Path) -> None:
    """Rewrite config.json in the older layout: rope_theta/rope_scaling at the top, torch_dtype."""
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        raw["rope_scaling"] = rope
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    path.write_text(json.dumps(raw, indent=2))


# -- pre-quantized fp8 checkpoints ---------------------------------------------------------
# Written by hand as each format specifies (transformers with compressed-tensors reads the
# compressed-tensors ones back, which checks that they are written right).

E4M3_MAX = 448.0
FP8_DYNAMIC = {  # compressed-tensors' FP8_DYNAMIC: per-channel weights, per-token activations
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                          "symmetric": True, "dynamic": True},
}  # fmt: skip
FP8_STATIC = {  # compressed-tensors' FP8: per-tensor weights, one static activation scale
    "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                "dynamic": False},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                          "symmetric": True, "dynamic": False},
}  # fmt: skip


def e4m3(weight: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] as e4m3 and its scale: [N, 1] per row, or [1] for the tensor."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax().reshape(1)
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    q = (w / (scale if per_row else scale[0])).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def _linear_modules(state: dict[str, torch.Tensor]) -> list[str]:
    return [
        n.removesuffix(".weight") for n in state if n.endswith(("_proj.weight", "lm_head.weight"))
    ]


def _rewrite(src: Path, out: Path, tensors: dict[str, torch.Tensor], quant: object) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    if quant is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def compressed_tensors(
    src: Path, out: Path, groups: dict[str, dict], ignore: tuple[str, ...] = ("lm_head",)
) -> Path:
    """A copy of the one-file checkpoint `src` as compressed-tensors publishes fp8: every
    linear that a group's targets match ("Linear", or "re:" a regex) and `ignore` does not
    becomes an e4m3 `.weight` with a float32 `.weight_scale` ([N, 1] for strategy channel,
    [1] for tensor), plus an `.input_scale` [1] for static activations."""
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    for module in _linear_modules(state):
        if module in ignore:
            continue
        scheme = next((g for g in groups.values() if _targets(module, g["targets"])), None)
        if scheme is None:
            continue
        per_row = scheme["weights"]["strategy"] == "channel"
        q, scale = e4m3(state[module + ".weight"], per_row)
        state[module + ".weight"], state[module + ".weight_scale"] = q, scale
        if not scheme["input_activations"]["dynamic"]:
            state[module + ".input_scale"] = torch.tensor([0.02])
    quant = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {name: {**g, "output_activations": None} for name, g in groups.items()},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }
    return _rewrite(src, out, state, quant)


def _targets(module: str, targets: list[str]) -> bool:
    return any(t == "Linear" or (t.startswith("re:") and re.match(t[3:], module)) for t in targets)


def fbgemm_fp8(src: Path, out: Path, not_convert: tuple[str, ...]) -> Path:
    """A copy of `src` as FBGEMM fp8 publishes it (Meta's 405B FP8): every linear but those
    under a `modules_to_not_convert` prefix is an e4m3 `.weight` with a float32
    `.weight_scale` [N, 1]."""
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    for module in _linear_modules(state):
        if any(module == p or module.startswith(p + ".") for p in not_convert):
            continue
        q, scale = e4m3(state[module + ".weight"], per_row=True)
        state[module + ".weight"], state[module + ".weight_scale"] = q, scale
    quant = {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": list(not_convert),
    }
    return _rewrite(src, out, state, quant)


def dequantized(src: Path, out: Path) -> Path:
    """A plain float32 copy of the fp8 checkpoint `src` whose weights are its dequantized
    values (weight * weight_scale), without quantization_config or scales."""
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    plain = {}
    for name, tensor in state.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        scale = state.get(name + "_scale")
        plain[name] = tensor.float() * scale.reshape(-1, 1) if scale is not None else tensor
    return _rewrite(src, out, plain, None)
