"""How a batched decode step is executed: eagerly, or by replaying a captured CUDA graph."""

from __future__ import annotations

from typing import Protocol

import torch

from torpor.worker.engine.model import Transformer
from torpor.worker.engine.options import EngineOptions, bucket


class Decoder(Protocol):
    def run(self, tokens: list[int], positions: list[int], needed_span: int) -> torch.Tensor:
        """float32 logits [n >= len(tokens), vocab]; row i is slot i."""
        ...


class EagerDecoder:
    """Runs the model's decode directly (CPU, or CUDA without graphs)."""

    def __init__(self, model: Transformer, options: EngineOptions) -> None:
        self.model = model
        self.spans = options.spans()
        self.device = model.embed.device

    def run(self, tokens: list[int], positions: list[int], needed_span: int) -> torch.Tensor:
        t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        p = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.model.decode(t, p, bucket(self.spans, needed_span))
