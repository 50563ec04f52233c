"""Reading Hugging Face safetensors checkpoints into the engine's weight layout.

The engine's tensors are not the checkpoint's one for one: q/k/v projections are fused into
one `wqkv` and gate/up into one `w13`, so each decode step launches fewer, larger matmuls.
`weight_plan` says which checkpoint tensors make each engine tensor; `Checkpoint.validate`
checks the whole checkpoint against it before a byte is copied, and `load_weights` fills
the placed tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from torpor.checkpoint_files import INDEX, CheckpointDir, as_checkpoint, fd_path
from torpor.errors import InvalidArgument
from torpor.worker.engine import fp8
from torpor.worker.engine.layout import TensorSpec
from torpor.worker.engine.model_config import ModelConfig

# Checkpoint tensors that carry no weights (buffers some exporters save), and the output
# projection that checkpoints with tied embeddings sometimes store anyway.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TIED_EXTRA = "lm_head.weight"


@dataclass(frozen=True)
class Part:
    """A checkpoint tensor and the shape the config says it must have."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightSource:
    """One engine tensor and the checkpoint tensors concatenated along dim 0 to make it."""

    target: str
    parts: tuple[Part, ...]
    quantized: bool = False  # stored as fp8 with a `<target>.scale` of one float per row

    @property
    def shape(self) -> tuple[int, ...]:
        rows = sum(p.shape[0] for p in self.parts)
        return (rows, *self.parts[0].shape[1:])


def _src(
    target: str, parts: list[tuple[str, tuple[int, ...]]], quantized: bool = False
) -> WeightSource:
    return WeightSource(target, tuple(Part(n, s) for n, s in parts), quantized)


def weight_plan(cfg: ModelConfig, fp8_weights: bool) -> list[WeightSource]:
    """The engine tensors of a model, in placement order."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    plan = [_src("embed", [("model.embed_tokens.weight", (cfg.vocab_size, h))])]
    for n in range(cfg.num_layers):
        att, mlp, out = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp.", f"layers.{n}."
        qkv = [(att + "q_proj", q), (att + "k_proj", kv), (att + "v_proj", kv)]
        up = [(mlp + "gate_proj", i), (mlp + "up_proj", i)]
        plan += [
            _src(out + "attn_norm", [(f"model.layers.{n}.input_layernorm.weight", (h,))]),
            _src(out + "wqkv", [(p + ".weight", (r, h)) for p, r in qkv], fp8_weights),
            _src(out + "wo", [(att + "o_proj.weight", (h, q))], fp8_weights),
            _src(out + "mlp_norm", [(f"model.layers.{n}.post_attention_layernorm.weight", (h,))]),
            _src(out + "w13", [(p + ".weight", (r, h)) for p, r in up], fp8_weights),
            _src(out + "w2", [(mlp + "down_proj.weight", (h, i))], fp8_weights),
        ]
        if cfg.qkv_bias:
            plan.append(_src(out + "bqkv", [(p + ".bias", (r,)) for p, r in qkv]))
        if cfg.o_bias:
            plan.append(_src(out + "bo", [(att + "o_proj.bias", (h,))]))
        if cfg.mlp_bias:
            plan.append(_src(out + "b13", [(p + ".bias", (r,)) for p, r in up]))
            plan.append(_src(out + "b2", [(mlp + "down_proj.bias", (h,))]))
    plan.append(_src("norm", [("model.norm.weight", (h,))]))
    # Tied embeddings share the embedding tensor, unless fp8 needs its own quantized copy.
    if not cfg.tie_word_embeddings:
        plan.append(_src("lm_head", [("lm_head.weight", (cfg.vocab_size, h))], fp8_weights))
    elif fp8_weights:
        plan.append(_src("lm_head", [("model.embed_tokens.weight", (cfg.vocab_size, h))], True))
    return plan


def weight_specs(plan: list[WeightSource], dtype: torch.dtype) -> list[TensorSpec]:
    """The tensors to place for a plan; quantized ones become fp8 data plus float32 scales."""
    specs: list[TensorSpec] = []
    for src in plan:
        if src.quantized:
            specs.append(TensorSpec(src.target, src.shape, fp8.FP8))
            specs.append(TensorSpec(src.target + ".scale", (src.shape[0],), torch.float32))
        else:
            specs.append(TensorSpec(src.target, src.shape, dtype))
    return specs


class Checkpoint:
    """The safetensors files of a checkpoint directory, and which file holds each tensor.

    Files are opened through `CheckpointDir` (confined to the model roots, regular files
    only) and safetensors reads them through `/proc/self/fd/N`, so what it maps is the file
    that was checked, whatever the directory holds by then.
    """

    def __init__(self, model_dir: Path | CheckpointDir) -> None:
        self.files = as_checkpoint(model_dir)
        self.dir = self.files.path
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.location: dict[str, str] = {}
        for file in self._tensor_files():
            try:
                with self.files.open(file) as fd, safe_open(fd_path(fd), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        self.location[name] = file
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except InvalidArgument:
                raise
            except Exception as exc:  # safetensors raises its own error types
                raise InvalidArgument(
                    f"{self.dir / file} is not a readable safetensors file: {exc}",
                    reason="CHECKPOINT_UNREADABLE",
                    metadata={"path": str(self.dir / file)},
                ) from exc

    def _tensor_files(self) -> list[str]:
        files = self.files.shard_names()  # each a plain name under the roots, or refused
        missing = [name for name in files if not self.files.exists(name)]
        if missing:
            raise InvalidArgument(
                f"{self.dir}: shards named in {INDEX} are missing: {', '.join(missing)}",
                reason="CHECKPOINT_INCOMPLETE",
            )
        if not files:
            raise InvalidArgument(
                f"{self.dir}: no *.safetensors files (torpor reads safetensors checkpoints only)",
                reason="CHECKPOINT_INCOMPLETE",
            )
        return files

    def validate(self, plan: list[WeightSource]) -> None:
        """Raise InvalidArgument listing every missing, misshapen or unexpected tensor."""
        problems: list[str] = []
        wanted: set[str] = set()
        for part in (p for src in plan for p in src.parts):
            wanted.add(part.name)
            got = self.shapes.get(part.name)
            if got is None:
                problems.append(f"missing {part.name}")
            elif got != part.shape:
                problems.append(f"{part.name} has shape {list(got)}, expected {list(part.shape)}")
        problems += [
            f"unexpected {name}"
            for name in sorted(self.shapes)
            if name not in wanted and not name.endswith(_IGNORED_SUFFIXES) and name != _TIED_EXTRA
        ]
        if problems:
            more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise InvalidArgument(
                f"checkpoint {self.dir} does not match its config.json: "
                f"{'; '.join(problems[:8])}{more}",
                reason="CHECKPOINT_MISMATCH",
                metadata={"problems": len(problems), "first": problems[0]},
            )


def load_weights(
    ckpt: Checkpoint,
    plan: list[WeightSource],
    tensors: dict[str, torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy (converting dtype, or quantizing) every planned tensor into its placed view.

    `progress` is called with the number of bytes placed so far.
    """
    done = 0
    with ExitStack() as stack, torch.no_grad():
        handles: dict[str, Any] = {}

        def read(name: str) -> torch.Tensor:
            file = ckpt.location[name]
            if file not in handles:
                fd = stack.enter_context(ckpt.files.open(file))  # checked again, at this open
                handles[file] = stack.enter_context(safe_open(fd_path(fd), framework="pt"))
            return handles[file].get_tensor(name)

        for src in plan:
            target = tensors[src.target]
            if src.quantized:
                parts = [read(p.name).to(target.device) for p in src.parts]
                full = torch.cat(parts) if len(parts) > 1 else parts[0]
                fp8.quantize_rowwise(full, target, tensors[src.target + ".scale"])
            else:
                row = 0
                for part in src.parts:
                    target[row : row + part.shape[0]].copy_(read(part.name))
                    row += part.shape[0]
            done += target.numel() * target.element_size()
            if progress is not None:
                progress(done)
