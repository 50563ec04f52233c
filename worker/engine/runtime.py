"""Building a runtime's memory: weights and KV cache placed, filled and wrapped in a model."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from torpor.errors import InvalidArgument
from torpor.worker.engine.config import ModelConfig
from torpor.worker.engine.layout import DevicePlacement, Layout, Placement
from torpor.worker.engine.model import Transformer, kv_spec
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.weights import Checkpoint, load_weights, weight_plan, weight_specs


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


def load_runtime(
    model_dir: Path,
    cfg: ModelConfig,
    options: EngineOptions,
    device: torch.device,
    dtype_name: str,
    compute_dtype: torch.dtype,
    placement: Placement | None,
    progress: Callable[[int, int], None] | None,
) -> tuple[Transformer, RuntimeMemory, LoadTimings]:
    """Validate the checkpoint, place and fill the weights, place and zero the KV cache."""
    start = time.perf_counter()
    if options.max_seq_len > cfg.max_position_embeddings:
        raise InvalidArgument(
            f"max_seq_len={options.max_seq_len} exceeds the model's max_position_embeddings="
            f"{cfg.max_position_embeddings}",
            reason="MAX_SEQ_LEN_TOO_LARGE",
        )
    plan = weight_plan(cfg, fp8_weights=dtype_name == "fp8")
    ckpt = Checkpoint(model_dir)
    ckpt.validate(plan)
    placement = placement if placement is not None else DevicePlacement(device)
    weights_layout = Layout.plan("weights", weight_specs(plan, compute_dtype))
    kv_layout = Layout.plan(
        "kv", [kv_spec(cfg, options.max_batch, options.max_seq_len, compute_dtype)]
    )
    t_config = time.perf_counter()

    tensors = placement.place(weights_layout)
    total = weights_layout.nbytes
    load_weights(
        ckpt, plan, tensors, None if progress is None else lambda done: progress(done, total)
    )
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
        graph_pool=getattr(placement, "graph_pool", None),
    )
    timings = LoadTimings(t_config - start, t_weights - t_config, t_kv - t_weights)
    return model, memory, timings
