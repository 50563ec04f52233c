"""Dummy weights (`load_format dummy`, as vLLM's `--load-format dummy`): a model of any
config.json without its checkpoint's safetensors.

The weights are random, generated where they live (on the GPU for a CUDA runtime) into the
same placed tensors a checkpoint would fill, with the same shapes, dtype and quantization
(fp8 data and per-row scales), scaled as `demo.RandomFiller` scales them so activations stay
O(1). The seed comes from the model's name, so every load of the same model on the same kind
of device gives the same weights, and so the same tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from torpor.worker.engine.demo import RandomFiller
from torpor.worker.engine.weights import WeightSource


def seed_for(model: str) -> int:
    """A stable seed for a model's name (not Python's salted hash): 62 bits of its SHA-256,
    leaving room for the per-tensor offsets the filler adds."""
    return int.from_bytes(hashlib.sha256(model.encode()).digest()[:8], "little") >> 2


class DummyFiller(RandomFiller):
    """Random weights for a runtime from a seed; the layer count (for the residual branches'
    damping) comes from the plan."""

    def __init__(self, seed: int) -> None:
        super().__init__(num_layers=1, seed=seed)

    def fill(
        self,
        plan: list[WeightSource],
        tensors: dict[str, torch.Tensor],
        progress: Callable[[int], None] | None,
    ) -> None:
        self.num_layers = max(1, sum(1 for src in plan if src.target.endswith(".wqkv")))
        super().fill(plan, tensors, progress)
