"""Exchange swap: one runtime's weights go GPU -> host while another's go host -> GPU, handle
by handle, each side taking only the memory the other has given back (plus torpord's slack),
so host RAM holds one copy of the two, not two (docs/PAGER.md, "Exchange swap").

The two sides run in two worker processes and meet on an exchange board
(`torpor.exchange_board`). Each side moves the weights arena one handle at a time:

- OUT (the runtime leaving the GPU): for each mapped handle, take host pages for its bytes
  (waiting for room), copy them device -> host, and only then release the handle. A handle
  whose bytes the host copy holds already is released without a copy.
- IN (the runtime coming back): for each unmapped handle, map it (waiting for room), copy its
  bytes host -> device, and only then give the host pages back.

So every byte of both runtimes is in at least one place at every moment: the outgoing bytes
are never released before they are on the host and counted, and the incoming host pages are
never freed before their bytes are on the device. A side that fails stops at a handle
boundary and leaves its runtime EXCHANGING (some handles here, the rest there); running the
exchange again with the sides reversed brings both back whole (`PagedRuntime.exchange`).

The copies run on each side's own stream, so the two directions overlap. Where host memory
is page-locked (CUDA), the outgoing side does not lock the pages it takes: locking runs at
the driver's pinning speed (about 2 GB/s), far below a copy's. Its bytes go device → pinned
staging buffers → the new pages (`DeviceDrainer`, threads `memmove`ing out), and the runtime
locks its new copy in the background afterwards (and hands it to the keeper). The incoming
side copies locked spans directly and unlocked ones through staging buffers (`HostStager`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torpor.errors import DataLoss
from torpor.exchange_board import Board, Side
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.host import HostBuffer, Stage

Inject = Callable[[int], None]
"""Called before each copy with the step's number (tests inject failures there)."""


@dataclass(frozen=True)
class ExchangeReport:
    side: Side
    seconds: float
    bytes: int  # weight bytes copied
    steps: int  # handles moved
    waited_s: float  # time spent waiting for the other side to give memory back

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class _Tally:
    moved: int = 0
    steps: int = 0
    waited: float = 0.0


class Mover:
    """Moves one runtime's weights arena across, for one side of one exchange."""

    def __init__(
        self,
        weights: Arena,
        buffer: HostBuffer,
        nbytes: int,
        board: Board,
        deadline: float,
        inject: Inject | None = None,
        stage: Stage | None = None,
    ) -> None:
        """`stage`: how unlocked host memory is copied to (IN: a `HostStager`) or from (OUT:
        a `DeviceDrainer`) the device; None copies directly (the CPU backend, where nothing
        is locked)."""
        self.weights = weights
        self.stage = stage
        self.buffer = buffer
        self.nbytes = nbytes  # the weights' bytes; the arena's last handle may hold padding
        self.board = board
        self.deadline = deadline
        self.inject = inject
        self.tally = _Tally()
        self._stream = torch.cuda.Stream(weights.device) if weights.device.type == "cuda" else None

    def spans(self) -> list[tuple[int, int, int]]:
        """(handle index, offset, weight bytes in it) for every handle of the arena."""
        return [
            (i, offset, max(0, min(size, self.nbytes - offset)))
            for i, (offset, size) in enumerate(self.weights.handle_extents())
        ]

    def out(self) -> None:
        """Every mapped handle to the host copy, then released."""
        for index, offset, n in self.spans():
            if not self.weights.handle_mapped(index):
                continue
            if n and not self.buffer.holds(offset, n):
                self._wait(Side.OUT, n)
                self.buffer.hold(offset, n, lock=self.stage is None)
                self.board.add("out_host_taken", n)
                try:
                    self._before_copy()
                    host = self.buffer.tensor[offset : offset + n]
                    if self.stage is not None and not self.buffer.locked(offset, n):
                        self.stage(self._device(index, n), host, [(0, n)])
                    else:
                        self._copy(host, self._device(index, n))
                except BaseException:
                    self.buffer.free(offset, n)  # the handle still holds the bytes
                    raise
                self.tally.moved += n
            self.board.add("out_gpu_freed", self.weights.unmap_handle(index))
            self._step(Side.OUT)

    def into(self) -> None:
        """Every unmapped handle mapped and filled from the host copy, whose pages are then
        given back."""
        for index, offset, n in self.spans():
            if self.weights.handle_mapped(index):
                continue
            size = self.weights.handle_extents()[index][1]
            self._wait(Side.IN, size)
            self.board.add("in_gpu_taken", self.weights.map_handle(index))
            if n:
                try:
                    if not self.buffer.holds(offset, n):
                        raise DataLoss(
                            f"handle {index} of the weights is neither mapped nor in the host copy",
                            reason="EXCHANGE_BYTES_LOST",
                            metadata={"handle": index},
                        )
                    self._before_copy()
                    host = self.buffer.tensor[offset : offset + n]
                    if self.stage is not None and not self.buffer.locked(offset, n):
                        self.stage(host, self._device(index, n), [(0, n)])
                    else:
                        self._copy(self._device(index, n), host)
                except BaseException:
                    self.weights.unmap_handle(index)  # the host copy still holds the bytes
                    raise
                self.buffer.free(offset, n)
                self.board.add("in_host_freed", n)
                self.tally.moved += n
            self._step(Side.IN)

    # -- helpers ------------------------------------------------------------------------------

    def _device(self, index: int, n: int) -> torch.Tensor:
        return self.weights.handle_view(index)[:n]

    def _wait(self, side: Side, n: int) -> None:
        start = time.monotonic()
        self.board.wait_room(side, n, self.deadline)
        self.tally.waited += time.monotonic() - start

    def _before_copy(self) -> None:
        if self.inject is not None:
            self.inject(self.tally.steps)

    def _step(self, side: Side) -> None:
        self.tally.steps += 1
        self.board.step_done(side)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy and wait for it: the bytes are in `dst` when this returns."""
        if self._stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
        self._stream.synchronize()
