"""The engine's memory seam, served from arenas: each region of a runtime is one arena.

`ArenaPlacement.place(layout)` reserves an arena of the layout's size (at the address a
snapshot recorded, when one is asked for and free), maps it and hands the engine views at the
layout's offsets. On CUDA it also provides the graph pool: a third arena behind a
`torch.cuda.MemPool`, so the activations of captured graphs can be released too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from torpor.errors import FailedPrecondition
from torpor.log import get_logger
from torpor.worker.engine.layout import Layout
from torpor.worker.pager import backend_for
from torpor.worker.pager.arena import DEFAULT_HANDLE_BYTES, Arena
from torpor.worker.pager.backend import MemoryBackend

log = get_logger("pager.placement")

MiB = 1 << 20
GRAPH_REGION = "graphs"


@dataclass(frozen=True)
class PagerOptions:
    """How a runtime's memory is paged. Bounds are checked by `validate()`."""

    device: str = "cpu"
    """cpu, cuda or cuda:N: the backend of the arenas."""
    handle_bytes: int = DEFAULT_HANDLE_BYTES
    """Physical allocation unit of an arena (measured: 2 MiB handles map 25x slower)."""
    graph_pool_bytes: int = 512 * MiB
    """Size of the arena behind the CUDA-graph memory pool (CUDA only)."""
    host_copy: bool = True
    """Keep a retained (pinned) host copy of the weights, made once right after load, so a
    host-level suspend only unmaps."""
    reader_threads: int = 4
    """Threads reading snapshot chunks from disk during a disk restore."""
    staging_buffers: int = 4
    """Pinned staging buffers in the disk-restore ring (each holds one chunk)."""
    staging_limit: int = 0
    """The most bytes this runtime's staging buffers hold at once (a disk-restore ring, a
    snapshot write's buffer, the deep resume's stager), pinned on CUDA: torpord's
    WorkerLoadRequest.staging_bytes, which it counts in its host budget. 0: no limit."""
    direct_io: bool = True
    """Read chunks with O_DIRECT where the filesystem allows it."""
    stream_resume: bool = True
    """Serve as soon as a resume from the page-locked host copy has queued its copies: each
    layer waits on the device for its own weights (CUDA; see gate.py)."""
    stage_threads: int = 12
    """Threads copying the unlocked host copy into pinned staging buffers on a deep resume
    (memory-bandwidth bound: 10 / 17 / 25 / 31 GB/s with 2 / 4 / 8 / 12 on an H200 host)."""

    keeper_socket: str | None = None
    """Unix socket of the GPU's keeper (keeper.py), which keeps the host copy locked in its
    own process and fills the weights at DMA speed on a deep resume; without one (or when it
    is lost) a deep resume goes through staging buffers."""

    def validate(self) -> None:
        from torpor.worker.engine.options import _bound

        _bound("handle_bytes", self.handle_bytes, 2 * MiB, 1 << 40)
        _bound("graph_pool_bytes", self.graph_pool_bytes, 2 * MiB, 1 << 40)
        _bound("reader_threads", self.reader_threads, 1, 64)
        _bound("staging_buffers", self.staging_buffers, 2, 64)
        _bound("stage_threads", self.stage_threads, 1, 64)
        _bound("staging_limit", self.staging_limit, 0, 1 << 40)


class ArenaPlacement:
    """Places each region of a runtime in its own arena; keeps the arenas for the pager."""

    def __init__(self, options: PagerOptions, addresses: Mapping[str, int] | None = None) -> None:
        self.options = options
        self.backend: MemoryBackend = backend_for(
            options.device, exportable=options.keeper_socket is not None
        )
        self.addresses = dict(addresses or {})
        self.arenas: dict[str, Arena] = {}
        self.regions: dict[str, torch.Tensor] = {}  # region -> flat uint8 view
        self.graph_pool = None
        if self.backend.device.type == "cuda":
            self.graph_pool = self._make_graph_pool()

    def place(self, layout: Layout) -> dict[str, torch.Tensor]:
        if layout.region in self.arenas:
            raise FailedPrecondition(f"region {layout.region!r} is already placed")
        arena = self._arena(layout.region, layout.nbytes)
        flat = arena.tensor(0, (layout.nbytes,), torch.uint8)
        self.regions[layout.region] = flat
        return layout.views(flat)

    def _arena(self, region: str, nbytes: int) -> Arena:
        arena = Arena(
            region,
            nbytes,
            self.backend,
            handle_bytes=self.options.handle_bytes,
            address=self.addresses.get(region),
        )
        try:
            arena.map()
        except BaseException:
            arena.close()
            raise
        self.arenas[region] = arena
        log.info(
            "arena_placed",
            region=region,
            nbytes=arena.nbytes,
            address=hex(arena.address),
            requested=self.addresses.get(region) is not None,
            honored=arena.address_honored,
        )
        return arena

    def _make_graph_pool(self) -> object:
        from torpor.worker.pager.graph_pool import GraphPool

        arena = self._arena(GRAPH_REGION, self.options.graph_pool_bytes)
        return GraphPool(arena)

    @property
    def graph_pool_id(self) -> object:
        return None if self.graph_pool is None else self.graph_pool.id  # type: ignore[attr-defined]

    def arena_addresses(self) -> dict[str, int]:
        return {name: arena.address for name, arena in self.arenas.items()}

    def mapped_bytes(self) -> int:
        return sum(a.mapped_bytes for a in self.arenas.values())

    def close(self) -> None:
        """Release every arena (memory and address ranges). Idempotent."""
        for arena in self.arenas.values():
            arena.close()
