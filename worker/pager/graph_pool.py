"""A graph memory pool that can be unmapped: torch's caching allocator served from one arena.

The activations and workspaces of captured CUDA graphs live in torch's caching allocator, and
their addresses are baked into the graphs. To release that memory while a runtime is
suspended, and keep the graphs valid, the memory must come back at the same addresses. This
module makes a `torch.cuda.MemPool` whose segments are carved out of one `Arena`:

    torch caching allocator ──(segment alloc/free)──▶ ctypes callbacks ──▶ ExtentAllocator
                                                                            over one Arena

Graphs are captured with `torch.cuda.graph(g, pool=graph_pool.id)` (or inside
`graph_pool.use()`); `graph_pool.arena.unmap()` then releases every byte of every graph in the
pool in one step and `map()` brings it back at the same addresses. Nothing in the pool is
saved: activations are scratch, rewritten by the next replay.

Approaches considered:
- Keep graph memory in ordinary cudaMalloc segments and copy it out and back. Wasteful (it is
  scratch), and the segments cannot be freed without invalidating the graphs.
- Re-capture graphs after resume: seconds per batch size, and the point of the pager is to
  avoid exactly that.
- A compiled allocator (vLLM's cumem_allocator.cpp) or an LD_PRELOAD hook of cudaMalloc
  (torch_memory_saver): fast, but a C++ build per torch and CUDA version, and a preload hook
  intercepts every allocation of the process.
- torch's `expandable_segments`: VMM inside torch, but torch owns the handles and has no API
  to unmap them while keeping the addresses; `MemPool` with a custom allocator also refuses
  expandable segments ("torch.cuda.MemPool doesn't currently support expandable_segments"),
  so that setting must stay off in workers.
- Mapping physical memory on demand inside the alloc callback: the callback then makes driver
  calls (cuMemCreate/cuMemMap) during stream capture, which the CUDA documentation does not
  promise to be capture-safe. Rejected.
- Chosen: ctypes callbacks handed to `torch._C._cuda_customAllocator` (signatures from
  torch/csrc/cuda/CUDAPluggableAllocator.h: `void* alloc(size_t size, int device,
  cudaStream_t stream)` and `void free(void* ptr, size_t size, int device, cudaStream_t
  stream)`), serving segments from an arena that is fully mapped up front. The callbacks make
  no CUDA calls (legal during capture, cheap), no extension is compiled, and the pool's size is
  a fixed budget, which is what byte-accurate admission wants anyway. A probe confirmed that a
  ctypes callback allocator works (docs/PAGER.md, "Graph pool"); on an H200 a
  graph captured into this pool replayed bit-identical after unmap and map (bench/pager_probe.py).

Constraints:
- The callbacks are Python: torch calls them with its allocator lock held, and they take the
  GIL. Use the pool from one thread at a time (the engine thread), or a thread that holds the
  GIL while waiting for torch's allocator lock could deadlock with one that holds that lock
  while waiting for the GIL.
- The callbacks must outlive torch's allocator object, which may outlive this module's
  objects: they are kept in a module-level list for the life of the process.
- An allocation while the arena is unmapped, or beyond its size, returns NULL: torch raises
  its out-of-memory error. Suspend only when no graph can run.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from typing import Any, cast

import torch

from torpor.errors import FailedPrecondition
from torpor.log import get_logger
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.extents import ExtentAllocator

# torch rounds pool segments to 2 MiB (kSmallBuffer / kRoundLarge), and 2 MiB is the VMM
# granularity on Hopper: aligning extents to it costs nothing.
DEFAULT_ALIGNMENT = 2 * 1024 * 1024

ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)

# Everything whose address was handed to torch lives as long as the process (see above).
_KEEP_ALIVE: list[object] = []

_log = get_logger("pager")


class ArenaAllocator:
    """The alloc/free callbacks of a torch pluggable allocator, served from one arena.

    Needs no GPU: the callbacks only do offset arithmetic, so they are tested on the CPU
    backend by calling them through their C function pointers.
    """

    def __init__(self, arena: Arena, *, alignment: int = DEFAULT_ALIGNMENT) -> None:
        self._arena = arena
        self._extents = ExtentAllocator(arena.nbytes, alignment)
        self._lock = threading.Lock()
        self._alloc_fn = ALLOC_FN(self._alloc)
        self._free_fn = FREE_FN(self._free)
        self.refused = 0  # allocations answered with NULL (pool full or arena unmapped)
        _KEEP_ALIVE.append(self)

    @property
    def arena(self) -> Arena:
        return self._arena

    @property
    def alloc_address(self) -> int:
        """The C address of `void* alloc(size_t, int, cudaStream_t)`."""
        address = ctypes.cast(self._alloc_fn, ctypes.c_void_p).value
        assert address is not None
        return address

    @property
    def free_address(self) -> int:
        """The C address of `void free(void*, size_t, int, cudaStream_t)`."""
        address = ctypes.cast(self._free_fn, ctypes.c_void_p).value
        assert address is not None
        return address

    @property
    def used_bytes(self) -> int:
        return self._extents.used_bytes

    @property
    def high_water(self) -> int:
        """The most of the arena ever in use: what the pool's budget must cover."""
        return self._extents.high_water

    @property
    def live(self) -> int:
        return self._extents.live

    def _alloc(self, size: int, device: int, stream: Any) -> int | None:
        # A callback must never raise: ctypes would print the error and return garbage.
        try:
            with self._lock:
                offset = self._extents.allocate(size) if self._arena.is_mapped else None
            if offset is not None:
                return self._arena.address + offset
            self.refused += 1
            _log.warning(
                "graph_pool_refused",
                arena=self._arena.name,
                size=size,
                mapped=self._arena.is_mapped,
                used=self._extents.used_bytes,
                capacity=self._extents.capacity,
            )
        except BaseException as e:
            self.refused += 1
            _log.error("graph_pool_alloc_failed", arena=self._arena.name, size=size, error=repr(e))
        return None

    def _free(self, ptr: int | None, size: int, device: int, stream: Any) -> None:
        try:
            offset = (ptr or 0) - self._arena.address
            with self._lock:
                freed = self._extents.free(offset)
            if freed < size:
                _log.error("graph_pool_free_size", arena=self._arena.name, size=size, had=freed)
        except BaseException as e:
            _log.error("graph_pool_free_failed", arena=self._arena.name, ptr=ptr, error=repr(e))


class GraphPool:
    """A `torch.cuda.MemPool` whose memory is one CUDA arena.

    Capture graphs with `torch.cuda.graph(g, pool=pool.id)` or allocate inside `pool.use()`;
    `pool.arena.unmap()` / `map()` release and restore all of it at the same addresses. The
    arena must be mapped before anything is allocated; closing the arena is the owner's job,
    after every graph and tensor of the pool is gone.
    """

    def __init__(self, arena: Arena, *, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if arena.device.type != "cuda":
            raise FailedPrecondition(
                f"a graph pool needs a CUDA arena; {arena.name!r} is on {arena.device}",
                reason="GRAPH_POOL_NEEDS_CUDA",
                metadata={"arena": arena.name, "device": arena.device},
            )
        self.arena = arena
        self.allocator = ArenaAllocator(arena, alignment=alignment)
        self._torch_allocator = torch._C._cuda_customAllocator(
            self.allocator.alloc_address, self.allocator.free_address
        )
        _KEEP_ALIVE.append(self._torch_allocator)
        # A MemPool binds to the current device when it is created.
        with torch.cuda.device(arena.device):
            self.pool = torch.cuda.MemPool(self._torch_allocator)

    @property
    def id(self) -> tuple[int, int]:
        """The pool token for `torch.cuda.graph(..., pool=...)`."""
        return self.pool.id

    @contextlib.contextmanager
    def use(self) -> Iterator[GraphPool]:
        """Route this thread's CUDA allocations on the arena's device to the pool."""
        with torch.cuda.use_mem_pool(self.pool, device=self.arena.device):
            yield self

    def graph(self, cuda_graph: torch.cuda.CUDAGraph, **kwargs: Any) -> torch.cuda.graph:
        """`torch.cuda.graph(cuda_graph, pool=self.id, **kwargs)`: capture into this pool."""
        # A MemPool id is the same (int, int) token as graph_pool_handle(); torch types the
        # latter as a NewType, hence the cast.
        return torch.cuda.graph(cuda_graph, pool=cast(Any, self.id), **kwargs)
