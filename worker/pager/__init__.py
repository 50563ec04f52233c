"""The pager's memory layer: arenas whose physical memory comes and goes at fixed addresses.

An `Arena` reserves a virtual address range once and maps physical memory into it in large
handles; `unmap()` gives all of that memory back while the addresses stay reserved, and `map()`
brings it back at the same addresses, so tensors, CUDA graphs and allocator state that hold raw
pointers stay valid. The memory comes from a `MemoryBackend`: `CpuBackend` (mmap + memfd, for
hosts without a GPU and for CI) or `CudaBackend` (CUDA VMM through `cuda.bindings.driver`).
docs/PAGER.md describes the design.
"""

import torch

from torpor.errors import InvalidArgument
from torpor.worker.pager.arena import DEFAULT_HANDLE_BYTES, Arena, ArenaState
from torpor.worker.pager.backend import Allocation, MemoryBackend, Reservation
from torpor.worker.pager.cpu import CpuBackend
from torpor.worker.pager.host import HostBuffer

__all__ = [
    "DEFAULT_HANDLE_BYTES",
    "Allocation",
    "Arena",
    "ArenaState",
    "CpuBackend",
    "HostBuffer",
    "MemoryBackend",
    "Reservation",
    "backend_for",
]


def backend_for(device: str, *, exportable: bool = False) -> MemoryBackend:
    """The backend for a torch-style device string: `cpu`, `cuda` or `cuda:N`; `exportable`
    makes CUDA allocations that another process can import (CPU ones always can).

    The CUDA backend is imported here, not at the top, so that the CPU path never loads the
    CUDA driver bindings.
    """
    try:
        parsed: torch.device | None = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is not None and parsed.type == "cpu":
        return CpuBackend()
    if parsed is not None and parsed.type == "cuda":
        from torpor.worker.pager.cuda import CudaBackend

        return CudaBackend(parsed.index or 0, exportable=exportable)
    raise InvalidArgument(
        f"unknown pager device {device!r}; use 'cpu', 'cuda' or 'cuda:N'",
        reason="BAD_DEVICE",
        metadata={"device": device},
    )
