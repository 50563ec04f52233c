"""Serving while the weights are still on their way back (a streamed resume).

A resume from the page-locked host copy enqueues the copies of the weights in arena order on
a side stream, with an event after each piece, and returns at once. The model then waits,
stage by stage, for the bytes that stage reads (`WeightsGate`, installed as the model's
gate): a request that arrived for the suspended runtime runs its first layers while the
last ones are still being copied, and its first token comes a few milliseconds after the
last byte, instead of one whole prefill later (measured on an H200: 80 to 150 ms for a
128-token prompt on a 70B-shaped fp8 runtime).

The waits are device-side (`cudaStreamWaitEvent`): the engine thread queues its kernels
without blocking, and nothing here runs on the host per layer beyond one list lookup. Once
the last copy is done the gate removes itself.

Stages: stage i < L runs layer i, and may read the embedding (stage 0) and layer i+1's first
norm (the residual add at the end of layer i is fused with it); stage L is the final norm and
the LM head, and waits for everything. Weights the layout places out of layer order simply
make a stage wait longer, never less than it must.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from typing import Any

from torpor.worker.engine.layout import Layout

_LAYER = re.compile(r"layers\.(\d+)\.")


def stage_ends(layout: Layout, num_layers: int) -> list[int]:
    """For each stage 0..num_layers, the end of the arena prefix it needs."""
    first_use = [0] * (num_layers + 1)  # per stage: the largest end first needed there
    for entry in layout.entries:
        name = entry.spec.name
        match = _LAYER.match(name)
        if match:
            stage = max(int(match.group(1)) - 1, 0)
        elif name == "embed":
            stage = 0
        else:
            stage = num_layers
        first_use[stage] = max(first_use[stage], entry.end)
    ends, need = [], 0
    for end in first_use:
        need = max(need, end)
        ends.append(need)
    return ends


class WeightsGate:
    """Makes the compute stream wait for the copy of the bytes each stage reads.

    `marks` are (bytes copied from the arena's start, event recorded after them), in copy
    order; `ends` come from `stage_ends`; `wait(event)` makes the current stream wait (on
    CUDA: `torch.cuda.current_stream().wait_event`). One consumer stream: a wait already
    made covers every later stage that needs no more.
    """

    def __init__(
        self,
        marks: Sequence[tuple[int, Any]],
        ends: Sequence[int],
        wait: Callable[[Any], None],
    ) -> None:
        if not marks:
            raise ValueError("a gate needs at least one mark")
        self._copied = [end for end, _ in marks]
        self._events = [event for _, event in marks]
        self._ends = list(ends)
        self._wait = wait
        self._waited = -1  # index of the last mark waited for

    def __call__(self, stage: int) -> None:
        need = self._ends[min(max(stage, 0), len(self._ends) - 1)]
        i = min(bisect.bisect_left(self._copied, need), len(self._events) - 1)
        if i > self._waited:
            self._wait(self._events[i])
            self._waited = i

    def done(self) -> bool:
        """Whether the last copy has finished (then the gate is no longer needed)."""
        return bool(self._events[-1].query())

    def synchronize(self) -> None:
        """Block the host until every copy has finished."""
        self._events[-1].synchronize()
