"""Building a runtime's memory: weights and KV cache placed, filled and wrapped in a model."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from torpor.checkpoint_files import CheckpointDir
from torpor.errors import InvalidArgument
from torpor.quantization import Quantization
from torpor.worker.engine.layout import DevicePlacement, Layout, Placement
from torpor.worker.engine.model import Transformer, kv_spec
from torpor.worker.engine.model_config import ModelConfig
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.weights import (
    Checkpoint,
    WeightSource,
    load_weights,
    weight_plan,
    weight_specs,
)


@dataclass(frozen=True)
class LoadTimings:
    """Seconds spent in each phase of a cold load."""

    config_s: float = 0.0  # config, checkpoint index and validation
    weights_s: float = 0.0  # reading safetensors into placed memory (incl. conversion)
    kv_s: float = 0.0  # placing and zeroing the KV cache
    graphs_s: float = 0.0  # capturing decode graphs (with their warm-up)

    def with_graphs(self, seconds: float) -> LoadTimings:
        return replace(self, graphs_s=seconds)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class RuntimeMemory:
    """The placed regions of a runtime: what the pager pages."""

    weights: Layout
    kv: Layout
    weight_tensors: dict[str, torch.Tensor]
    kv_tensor: torch.Tensor
    placement: Any
    dtype: str
    graph_pool: Any = field(default=None)


class WeightFiller(Protocol):
    """Fills placed weight tensors: from a checkpoint (a cold load) or from a snapshot."""

    def check(self, plan: list[WeightSource], layout: Layout) -> None:
        """Raise before anything is placed if this source cannot fill `layout`."""
        ...

    def fill(
        self,
        plan: list[WeightSource],
        tensors: dict[str, torch.Tensor],
        progress: Callable[[int], None] | None,
    ) -> None:
        """Write every weight; `progress` gets the bytes written so far."""
        ...


class CheckpointFiller:
    """Reads (converting, quantizing or dequantizing) a Hugging Face safetensors checkpoint."""

    def __init__(
        self, model_dir: Path | CheckpointDir, quantization: Quantization | None = None
    ) -> None:
        self.checkpoint = Checkpoint(model_dir)
        self.quantization = quantization

    def check(self, plan: list[WeightSource], layout: Layout) -> None:
        self.checkpoint.validate(plan, self.quantization)

    def fill(
        self,
        plan: list[WeightSource],
        tensors: dict[str, torch.Tensor],
        progress: Callable[[int], None] | None,
    ) -> None:
        load_weights(self.checkpoint, plan, tensors, progress)


def plan_memory(
    cfg: ModelConfig, options: EngineOptions, dtype_name: str, compute_dtype: torch.dtype
) -> tuple[list[WeightSource], Layout, Layout]:
    """The weight plan and the layouts of the two regions a runtime needs."""
    if options.max_seq_len > cfg.max_position_embeddings:
        raise InvalidArgument(
            f"max_seq_len={options.max_seq_len} exceeds the model's max_position_embeddings="
            f"{cfg.max_position_embeddings}",
            reason="MAX_SEQ_LEN_TOO_LARGE",
        )
    plan = weight_plan(cfg, fp8_weights=dtype_name == "fp8")
    weights = Layout.plan("weights", weight_specs(plan, compute_dtype))
    kv = Layout.plan("kv", [kv_spec(cfg, options.max_batch, options.max_seq_len, compute_dtype)])
    return plan, weights, kv


def load_runtime(
    model_dir: Path | CheckpointDir,
    cfg: ModelConfig,
    options: EngineOptions,
    device: torch.device,
    dtype_name: str,
    compute_dtype: torch.dtype,
    placement: Placement | None,
    progress: Callable[[int, int], None] | None,
    filler: WeightFiller | None = None,
) -> tuple[Transformer, RuntimeMemory, LoadTimings]:
    """Check the weight source, place and fill the weights, place and zero the KV cache."""
    start = time.perf_counter()
    plan, weights_layout, kv_layout = plan_memory(cfg, options, dtype_name, compute_dtype)
    filler = filler if filler is not None else CheckpointFiller(model_dir, cfg.quantization)
    filler.check(plan, weights_layout)
    placement = placement if placement is not None else DevicePlacement(device)
    t_config = time.perf_counter()

    tensors = placement.place(weights_layout)
    total = weights_layout.nbytes
    filler.fill(plan, tensors, None if progress is None else lambda done: progress(done, total))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_weights = time.perf_counter()

    kv = placement.place(kv_layout)["kv"]
    kv.zero_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_kv = time.perf_counter()

    model = Transformer(cfg, tensors, kv, options.max_seq_len, compute_dtype)
    memory = RuntimeMemory(
        weights_layout,
        kv_layout,
        tensors,
        kv,
        placement,
        dtype_name,
        graph_pool=getattr(placement, "graph_pool_id", None),
    )
    timings = LoadTimings(t_config - start, t_weights - t_config, t_kv - t_weights)
    return model, memory, timings
