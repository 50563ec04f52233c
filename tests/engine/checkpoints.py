"""Random-weight checkpoints written by transformers' own model classes and save_pretrained."""

from __future__ import annotations

import json
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
