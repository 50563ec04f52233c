"""`torpor make-demo`: a small random-weight Llama checkpoint in exactly the Hugging Face format.

The tokenizer is a real byte-level BPE trained by `tokenizers` on a small built-in text and
padded with reserved special tokens to exactly the requested vocabulary size (as Llama 3
does), so every token id decodes. Weights are random but scaled so that activations stay
O(1) through the layers and the logits are spread out (not a uniform distribution).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from torpor.errors import InvalidArgument

if TYPE_CHECKING:
    from torpor.worker.engine.layout import Layout
    from torpor.worker.engine.weights import WeightSource

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
_TEXT = """\
The quick brown fox jumps over the lazy dog. A runtime that sleeps keeps its memory in order.
When a request arrives, the scheduler wakes the model, and the tokens begin to flow again.
Graphs are captured once; the addresses stay where they were, so nothing must be rebuilt.
Pages move from the device to the host and down to the disk, and back up when they are needed.
Every model has weights, a cache of keys and values, and a pool of memory for its kernels.
The operator asks what is resident, the daemon answers with bytes, tiers and estimates.
Once upon a time there was a small model that dreamed of being very large and very fast.
It learned the alphabet, then words, then sentences: hello world, good morning, thank you.
Numbers too: one two three four five six seven eight nine ten, 0 1 2 3 4 5 6 7 8 9 10 100.
Questions and answers, lists and tables, code and prose; def main(): return 0 # the end.
"""


@dataclass(frozen=True)
class DemoSpec:
    """The shape of a demo model. Validated: sizes must make a consistent Llama."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    intermediate: int = 0  # 0 picks about 2.7 x hidden, a multiple of 32
    max_position: int = 4096
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if min(self.layers, self.hidden, self.heads, self.kv_heads) < 1:
            problems.append("layers, hidden, heads and kv-heads must be >= 1")
        elif self.hidden % self.heads or (self.hidden // self.heads) % 2:
            problems.append(
                f"hidden ({self.hidden}) / heads ({self.heads}) must be an even integer"
            )
        elif self.heads % self.kv_heads:
            problems.append(
                f"heads ({self.heads}) must be a multiple of kv-heads ({self.kv_heads})"
            )
        if self.vocab < 300:
            problems.append(f"vocab ({self.vocab}) must be >= 300 (256 byte tokens and merges)")
        if problems:
            raise InvalidArgument("bad demo model: " + "; ".join(problems), reason="BAD_DEMO_SPEC")

    @property
    def ffn(self) -> int:
        return self.intermediate or max(32, int(self.hidden * 2.7) // 32 * 32)


def make_demo(out_dir: Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write config.json, generation_config.json, tokenizer files and model.safetensors."""
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(spec.vocab)
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    assert bos is not None and eos is not None  # both are special tokens of the trainer
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(_config(spec, bos, eos), indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(_weights(spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _train_tokenizer(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines(), trainer)
    # Pad to exactly `vocab` ids with reserved special tokens (they decode to nothing).
    missing = vocab - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": (
            "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
        ),
    }


def _config(spec: DemoSpec, bos: int, eos: int) -> dict[str, object]:
    # The layout current transformers writes (rope_parameters, dtype).
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.hidden // spec.heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": "float32",
        "use_cache": True,
    }


def _weights(spec: DemoSpec) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(spec.seed)
    h, head_dim = spec.hidden, spec.hidden // spec.heads

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm() -> torch.Tensor:
        return 1.0 + normal(h, std=0.1)

    w = {"model.embed_tokens.weight": normal(spec.vocab, h, std=1.0)}
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = normal(spec.heads * head_dim, h, std=1 / math.sqrt(h))
        w[p + "self_attn.k_proj.weight"] = normal(spec.kv_heads * head_dim, h, std=1 / math.sqrt(h))
        w[p + "self_attn.v_proj.weight"] = normal(spec.kv_heads * head_dim, h, std=1 / math.sqrt(h))
        # Residual branches are damped so the stream stays O(1) however many layers.
        branch = 1 / math.sqrt(2 * spec.layers)
        w[p + "self_attn.o_proj.weight"] = normal(h, h, std=branch / math.sqrt(h))
        w[p + "mlp.gate_proj.weight"] = normal(spec.ffn, h, std=1 / math.sqrt(h))
        w[p + "mlp.up_proj.weight"] = normal(spec.ffn, h, std=1 / math.sqrt(h))
        w[p + "mlp.down_proj.weight"] = normal(h, spec.ffn, std=branch / math.sqrt(spec.ffn))
    w["model.norm.weight"] = norm()
    # Logits of standard deviation about 3: peaked enough that greedy text is not noise.
    w["lm_head.weight"] = normal(spec.vocab, h, std=3 / math.sqrt(h))
    return {k: v.contiguous() for k, v in w.items()}


# The engine's bias tensors (worker/engine/weights.py, weight_plan): filled with zeros.
_BIASES = frozenset({"bqkv", "bo", "b13", "b2"})


class RandomFiller:
    """Fills placed weights with random values generated where they live (on the GPU for a
    CUDA runtime), scaled like `make_demo`'s, for runtimes too big to write as a checkpoint
    (a 70B-shaped benchmark runtime). fp8 weights get values of unit spread and per-row
    scales of 1/sqrt(fan-in). Deterministic for a seed and a device."""

    CHUNK_ELEMENTS = 1 << 26  # rows are generated in pieces of about this many elements

    def __init__(self, num_layers: int, seed: int = 0) -> None:
        self.num_layers = num_layers
        self.seed = seed

    def check(self, plan: list[WeightSource], layout: Layout) -> None:
        """Nothing to check: any plan can be filled."""

    def fill(
        self,
        plan: list[WeightSource],
        tensors: dict[str, torch.Tensor],
        progress: Callable[[int], None] | None,
    ) -> None:
        done = 0
        for name, tensor in tensors.items():
            gen = torch.Generator(tensor.device).manual_seed(self.seed + done)
            if name.endswith(".scale"):
                fan_in = tensors[name.removesuffix(".scale")].shape[1]
                tensor.fill_(self._std(name.removesuffix(".scale"), fan_in))
            elif tensor.dim() == 1 and name.rsplit(".", 1)[-1] in _BIASES:
                tensor.zero_()
            elif tensor.dim() == 1:  # norms
                tensor.fill_(1.0)
            else:
                std = 1.0 if tensor.dtype.itemsize == 1 else self._std(name, tensor.shape[1])
                self._normal(tensor, std, gen)
            done += tensor.numel() * tensor.element_size()
            if progress is not None:
                progress(done)

    def _std(self, name: str, fan_in: int) -> float:
        if name == "embed":
            return 1.0
        if name == "lm_head":
            return 3 / math.sqrt(fan_in)
        branch = 1 / math.sqrt(2 * self.num_layers) if name.endswith(("wo", "w2")) else 1.0
        return branch / math.sqrt(fan_in)

    def _normal(self, tensor: torch.Tensor, std: float, gen: torch.Generator) -> None:
        rows = max(1, self.CHUNK_ELEMENTS // max(1, tensor.shape[1]))
        for start in range(0, tensor.shape[0], rows):
            part = tensor[start : start + rows]
            values = torch.randn(part.shape, generator=gen, device=part.device) * std
            part.copy_(values.to(part.dtype))
