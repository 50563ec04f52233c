"""Reading Hugging Face safetensors checkpoints into the engine's weight layout.

The engine's tensors are not the checkpoint's one for one: q/k/v projections are fused into
one `wqkv` and gate/up into one `w13`, so each decode step launches fewer, larger matmuls.
`weight_plan` says which checkpoint tensors make each engine tensor; `Checkpoint.validate`
checks the whole checkpoint against it before a byte is copied, and `load_weights` fills
the placed tensors.

A pre-quantized fp8 checkpoint (`torpor.quantization`) publishes some linears as e4m3 weights
with a `weight_scale`. In an fp8 runtime their bytes are copied unchanged and their scales
become the engine's per-row `<target>.scale` (a per-tensor scale on every row of its part);
the linears it leaves unquantized (typically lm_head) stay unquantized. In any other dtype
they are dequantized (weight * scale) into ordinary tensors: the dequantized reference.
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
from torpor.quantization import LinearScheme, Method, Quantization
from torpor.worker.engine import fp8
from torpor.worker.engine.layout import TensorSpec
from torpor.worker.engine.model_config import ModelConfig

# Checkpoint tensors that carry no weights (buffers some exporters save), and the output
# projection that checkpoints with tied embeddings sometimes store anyway.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TIED_EXTRA = "lm_head.weight"
# safetensors' dtype names: the published e4m3, and what a scale may be stored in.
_E4M3 = "F8_E4M3"
_SCALE_DTYPES = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class Part:
    """A checkpoint tensor and the shape the config says it must have; `scheme` when it is a
    published e4m3 weight with its `<module>.weight_scale`."""

    name: str
    shape: tuple[int, ...]
    scheme: LinearScheme | None = None

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def scale_name(self) -> str:
        return self.module + ".weight_scale"


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


def _linear(
    cfg: ModelConfig, target: str, modules: list[tuple[str, tuple[int, ...]]], fp8_weights: bool
) -> WeightSource:
    """A linear's engine tensor. fp8 in an fp8 runtime: quantized at load from a plain
    checkpoint, copied as published from a pre-quantized one whose modules are quantized
    (all of a fused tensor's or none: checked when config.json was read)."""
    quant = cfg.quantization
    parts = tuple(
        Part(m + ".weight", shape, quant.scheme(m) if quant else None) for m, shape in modules
    )
    quantized = fp8_weights and (quant is None or parts[0].scheme is not None)
    return WeightSource(target, parts, quantized)


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
            _linear(cfg, out + "wqkv", [(p, (r, h)) for p, r in qkv], fp8_weights),
            _linear(cfg, out + "wo", [(att + "o_proj", (h, q))], fp8_weights),
            _src(out + "mlp_norm", [(f"model.layers.{n}.post_attention_layernorm.weight", (h,))]),
            _linear(cfg, out + "w13", [(p, (r, h)) for p, r in up], fp8_weights),
            _linear(cfg, out + "w2", [(mlp + "down_proj", (h, i))], fp8_weights),
        ]
        if cfg.qkv_bias:
            plan.append(_src(out + "bqkv", [(p + ".bias", (r,)) for p, r in qkv]))
        if cfg.o_bias:
            plan.append(_src(out + "bo", [(att + "o_proj.bias", (h,))]))
        if cfg.mlp_bias:
            plan.append(_src(out + "b13", [(p + ".bias", (r,)) for p, r in up]))
            plan.append(_src(out + "b2", [(mlp + "down_proj.bias", (h,))]))
    plan.append(_src("norm", [("model.norm.weight", (h,))]))
    # Tied embeddings share the embedding tensor, unless fp8 quantizes a copy of it at load
    # (a pre-quantized checkpoint keeps a tied head as published, unquantized).
    if not cfg.tie_word_embeddings:
        plan.append(_linear(cfg, "lm_head", [("lm_head", (cfg.vocab_size, h))], fp8_weights))
    elif fp8_weights and cfg.quantization is None:
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
        self.dtypes: dict[str, str] = {}  # safetensors' names: F32, BF16, F8_E4M3, ...
        self.location: dict[str, str] = {}
        for file in self._tensor_files():
            try:
                with self.files.open(file) as fd, safe_open(fd_path(fd), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        self.location[name] = file
                        tensor = f.get_slice(name)
                        self.shapes[name] = tuple(tensor.get_shape())
                        self.dtypes[name] = tensor.get_dtype()
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

    def validate(self, plan: list[WeightSource], quantization: Quantization | None = None) -> None:
        """Raise InvalidArgument listing every missing, misshapen or unexpected tensor, and
        every published fp8 tensor that is not what `quantization` says."""
        problems: list[str] = []
        wanted: set[str] = set()
        for part in (p for src in plan for p in src.parts):
            wanted.add(part.name)
            got = self.shapes.get(part.name)
            if got is None:
                problems.append(f"missing {part.name}")
            elif got != part.shape:
                problems.append(f"{part.name} has shape {list(got)}, expected {list(part.shape)}")
            else:
                problems += self._dtype_problems(part, quantization, wanted)
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

    def _dtype_problems(
        self, part: Part, quantization: Quantization | None, wanted: set[str]
    ) -> list[str]:
        """A weight published in e4m3 must have its scales (adding them to `wanted`); one
        its config leaves unquantized must not be e4m3."""
        dtype = self.dtypes.get(part.name, "")
        if part.scheme is None:
            if dtype.startswith("F8"):
                return [f"{part.name} is {dtype}, but config.json does not quantize it"]
            return []
        method = quantization.describe() if quantization else "fp8"
        if dtype != _E4M3:
            return [f"{part.name} is {dtype}, expected {_E4M3} ({method})"]
        rows = part.shape[0]
        scales = [(part.scale_name, ((rows, 1), (rows,)) if part.scheme.per_row else ((1,), ()))]
        if part.scheme.static_input:
            scales.append((part.module + ".input_scale", ((1,), ())))
        if quantization is not None and quantization.method is Method.FBGEMM_FP8:
            # FBGEMM's activation bound, if published per module: not used (see fp8.py).
            wanted.add(part.module + ".input_scale_ub")
        problems = []
        for name, shapes in scales:
            wanted.add(name)
            got = self.shapes.get(name)
            if got is None:
                problems.append(f"missing {name} ({method})")
            elif got not in shapes or self.dtypes[name] not in _SCALE_DTYPES:
                problems.append(
                    f"{name} is {self.dtypes[name]} {list(got)}, expected float "
                    f"{' or '.join(str(list(s)) for s in shapes)} ({method})"
                )
        return problems


def load_weights(
    ckpt: Checkpoint,
    plan: list[WeightSource],
    tensors: dict[str, torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy (converting dtype, quantizing, or dequantizing published fp8) every planned
    tensor into its placed view.

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
            if src.quantized and src.parts[0].scheme is None:
                parts = [read(p.name).to(target.device) for p in src.parts]
                full = torch.cat(parts) if len(parts) > 1 else parts[0]
                fp8.quantize_rowwise(full, target, tensors[src.target + ".scale"])
            else:
                scale = tensors[src.target + ".scale"] if src.quantized else None
                row = 0
                for part in src.parts:
                    rows = slice(row, row + part.shape[0])
                    _copy_part(part, read, target[rows], None if scale is None else scale[rows])
                    row += part.shape[0]
            done += target.numel() * target.element_size()
            if progress is not None:
                progress(done)


def _copy_part(
    part: Part,
    read: Callable[[str], torch.Tensor],
    out: torch.Tensor,
    out_scale: torch.Tensor | None,
) -> None:
    """Copy one checkpoint tensor into its rows of an engine tensor. A published e4m3 weight
    goes into an fp8 tensor byte for byte, its scale onto every row it covers (`out_scale`),
    or else is dequantized into `out`'s dtype."""
    if part.scheme is None or out_scale is not None:
        out.copy_(read(part.name))  # straight from the mapped file: no copy on the device
    if part.scheme is None:
        return
    scale = read(part.scale_name).to(out.device, torch.float32).reshape(-1, 1)  # [N, 1] | [1, 1]
    if out_scale is not None:
        out_scale.copy_(scale.expand(part.shape[0], 1).reshape(-1))
    else:
        out.copy_(fp8.dequantize(read(part.name).to(out.device), scale))
