"""The extent allocator behind the graph pool: bump allocation, reuse, coalescing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.errors import InvalidArgument
from torpor.worker.pager.extents import ExtentAllocator

MiB = 1024 * 1024


def test_a_fresh_range_is_handed_out_like_a_bump_allocator() -> None:
    extents = ExtentAllocator(16 * MiB, 2 * MiB)
    assert [extents.allocate(n) for n in (1, 2 * MiB, 3 * MiB)] == [0, 2 * MiB, 4 * MiB]
    assert extents.used_bytes == 8 * MiB
    assert extents.high_water == 8 * MiB


def test_freed_extents_are_reused_before_the_range_grows() -> None:
    extents = ExtentAllocator(16 * MiB, 2 * MiB)
    a, b, _ = (extents.allocate(2 * MiB) for _ in range(3))
    assert a is not None and b is not None
    extents.free(a)
    extents.free(b)
    assert extents.allocate(4 * MiB) == 0  # a and b coalesced
    assert extents.high_water == 6 * MiB


def test_frees_coalesce_into_one_extent() -> None:
    extents = ExtentAllocator(8 * MiB, MiB)
    offsets = [extents.allocate(MiB) for _ in range(8)]
    for offset in (offsets[1], offsets[3], offsets[2], offsets[0], *offsets[4:]):
        assert offset is not None
        extents.free(offset)
    assert extents.free_extents() == [(0, 8 * MiB)]


def test_a_full_range_answers_none() -> None:
    extents = ExtentAllocator(4 * MiB, 2 * MiB)
    assert extents.allocate(4 * MiB) == 0
    assert extents.allocate(1) is None


def test_bad_frees_and_sizes_are_refused() -> None:
    extents = ExtentAllocator(4 * MiB, 2 * MiB)
    offset = extents.allocate(1)
    assert offset is not None
    extents.free(offset)
    with pytest.raises(InvalidArgument):
        extents.free(offset)
    with pytest.raises(InvalidArgument):
        extents.allocate(0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * MiB)), max_size=60))
def test_extents_never_overlap_and_account_for_every_byte(ops: list[tuple[bool, int]]) -> None:
    capacity, alignment = 32 * MiB, 2 * MiB
    extents = ExtentAllocator(capacity, alignment)
    live: dict[int, int] = {}
    for allocate, n in ops:
        if allocate or not live:
            offset = extents.allocate(n)
            if offset is not None:
                live[offset] = extents.size_of(offset)
                assert offset % alignment == 0 and live[offset] >= n
        else:
            victim = sorted(live)[n % len(live)]
            assert extents.free(victim) == live.pop(victim)
        spans = sorted(live.items())
        assert all(a + size <= b for (a, size), (b, _) in itertools.pairwise(spans))
        free = extents.free_extents()
        assert sum(size for _, size in free) + sum(live.values()) == capacity
        assert all(a + size < b for (a, size), (b, _) in itertools.pairwise(free))
