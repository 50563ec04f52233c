"""Batched decode captured as CUDA graphs, one per (batch size, attention span) bucket.

A graph bakes in every device pointer it touches: the weights, the KV cache, the static
input buffers below and its own activations in the graph memory pool. This is why the pager
keeps all of them at fixed virtual addresses across suspend and resume.
"""

from __future__ import annotations

from typing import Any

import torch

from torpor.worker.engine.model import Transformer
from torpor.worker.engine.options import EngineOptions, bucket


class GraphDecoder:
    """Replays a captured graph for the smallest bucket that fits each step."""

    def __init__(self, model: Transformer, options: EngineOptions, pool: Any = None) -> None:
        self.model = model
        self.batch_sizes = options.batch_sizes()
        self.spans = options.spans()
        device = model.embed.device
        largest = self.batch_sizes[-1]
        # Static inputs: the engine writes them on the device between replays.
        self.tokens = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warm_up()
        # Largest first, so smaller graphs reuse the pool memory the larger ones freed.
        for batch in reversed(self.batch_sizes):
            for span in reversed(self.spans):
                self.graphs[batch, span] = self._capture(batch, span)

    def _warm_up(self) -> None:
        # cuBLAS handles, workspaces and kernel selection happen outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for batch in self.batch_sizes:
                self.model.decode(self.tokens[:batch], self.positions[:batch], self.spans[0])
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, batch: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.decode(self.tokens[:batch], self.positions[:batch], span)
        return graph, logits

    def launch(self, batch: int, span: int) -> torch.Tensor:
        graph, logits = self.graphs[bucket(self.batch_sizes, batch), bucket(self.spans, span)]
        graph.replay()
        return logits
