"""How a batched decode step is executed: eagerly, or by replaying a captured CUDA graph.

A decoder owns the step's inputs as static device tensors, `tokens` and `positions` (one row
per KV slot), so the engine can feed each step's sampled tokens back on the device without a
round trip through the host.
"""

from __future__ import annotations

from typing import Protocol

import torch

from torpor.worker.engine.model import Transformer
from torpor.worker.engine.options import EngineOptions, bucket


class Decoder(Protocol):
    tokens: torch.Tensor  # [max_batch] int64, on the device; row i is slot i
    positions: torch.Tensor  # [max_batch] int64, on the device

    def launch(self, batch: int, span: int) -> torch.Tensor:
        """Enqueue one decode step over at least the first `batch` slots, attending over at
        least `span` positions; return float32 logits [n >= batch, vocab] (not yet computed)."""
        ...


class EagerDecoder:
    """Runs the model's decode directly (CPU, or CUDA without graphs)."""

    def __init__(self, model: Transformer, options: EngineOptions) -> None:
        self.model = model
        self.spans = options.spans()
        device = model.embed.device
        self.tokens = torch.zeros(options.max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(options.max_batch, dtype=torch.long, device=device)

    def launch(self, batch: int, span: int) -> torch.Tensor:
        span = bucket(self.spans, span)
        return self.model.decode(self.tokens[:batch], self.positions[:batch], span)
