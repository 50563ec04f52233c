"""The graph pool's allocator callbacks, called through their C function pointers as torch does.

The callbacks only do offset arithmetic over an arena, so they run on the CPU backend; the
MemPool and graph capture are tested on a GPU in test_cuda_arena.py.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from torpor.errors import FailedPrecondition
from torpor.worker.pager import Arena, CpuBackend
from torpor.worker.pager.graph_pool import ALLOC_FN, FREE_FN, ArenaAllocator, GraphPool

MiB = 1024 * 1024


@pytest.fixture
def arena() -> Iterator[Arena]:
    with Arena("graphs", 16 * MiB, CpuBackend(), handle_bytes=4 * MiB) as a:
        a.map()
        yield a


def c_functions(allocator: ArenaAllocator) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    """The callbacks as torch sees them: bare C function pointers."""
    return ALLOC_FN(allocator.alloc_address), FREE_FN(allocator.free_address)


def test_segments_come_from_the_arena_and_are_reused(arena: Arena) -> None:
    allocator = ArenaAllocator(arena)
    alloc, free = c_functions(allocator)

    first = alloc(2 * MiB, 0, None)
    second = alloc(20 * 1024, 0, None)  # rounded up to the 2 MiB alignment
    assert first == arena.address
    assert second == arena.address + 2 * MiB
    assert allocator.used_bytes == 4 * MiB

    free(first, 2 * MiB, 0, None)
    assert alloc(MiB, 0, None) == first
    assert allocator.high_water == 4 * MiB
    assert allocator.live == 2


def test_a_full_or_unmapped_pool_answers_null_and_never_raises(arena: Arena) -> None:
    allocator = ArenaAllocator(arena)
    alloc, free = c_functions(allocator)

    assert alloc(16 * MiB, 0, None) == arena.address
    assert alloc(1, 0, None) is None  # full: torch turns NULL into its out-of-memory error

    free(arena.address, 16 * MiB, 0, None)
    arena.unmap()
    assert alloc(1, 0, None) is None  # suspended: no segment may be handed out
    free(arena.address + 12345, 1, 0, None)  # a bogus free is logged, not raised into C
    assert allocator.refused == 2

    arena.map()
    assert alloc(MiB, 0, None) == arena.address  # the same addresses after resume


def test_a_graph_pool_needs_a_cuda_arena(arena: Arena) -> None:
    with pytest.raises(FailedPrecondition) as raised:
        GraphPool(arena)
    assert raised.value.reason == "GRAPH_POOL_NEEDS_CUDA"
