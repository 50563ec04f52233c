"""First-fit extent allocation inside a fixed range, for allocators that sub-divide an arena.

Pure bookkeeping with offsets (no memory is touched), so it is tested exhaustively on any
machine. The graph pool uses it to hand torch's caching allocator segments of one arena.
"""

from __future__ import annotations

import bisect

from torpor.errors import InvalidArgument
from torpor.worker.pager.backend import check_positive, round_up


class ExtentAllocator:
    """Allocates aligned extents of [0, capacity); frees coalesce with their neighbours.

    First fit from the lowest offset: on a fresh range it behaves as a bump allocator, and
    freed extents are reused before the high-water mark grows.
    """

    def __init__(self, capacity: int, alignment: int) -> None:
        check_positive("capacity", capacity)
        check_positive("alignment", alignment)
        self._capacity = capacity
        self._alignment = alignment
        # Free extents as (offset, size), sorted by offset; no two of them touch.
        self._free: list[tuple[int, int]] = [(0, capacity)]
        self._used: dict[int, int] = {}
        self._high_water = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        """Bytes in live extents (sizes rounded up to the alignment)."""
        return sum(self._used.values())

    @property
    def high_water(self) -> int:
        """The highest end offset ever handed out: how much of the range was ever needed."""
        return self._high_water

    @property
    def live(self) -> int:
        """The number of live extents."""
        return len(self._used)

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a new extent of at least `nbytes`, or None when none fits."""
        if nbytes <= 0:
            raise InvalidArgument(
                f"extent size must be positive, got {nbytes}",
                reason="BAD_SIZE",
                metadata={"nbytes": nbytes},
            )
        size = round_up(nbytes, self._alignment)
        for i, (offset, free) in enumerate(self._free):
            if free < size:
                continue
            if free == size:
                del self._free[i]
            else:
                self._free[i] = (offset + size, free - size)
            self._used[offset] = size
            self._high_water = max(self._high_water, offset + size)
            return offset
        return None

    def size_of(self, offset: int) -> int:
        """The size of the live extent at `offset`."""
        return self._used[offset]

    def free(self, offset: int) -> int:
        """Return the extent at `offset` to the free list; its size."""
        size = self._used.pop(offset, None)
        if size is None:
            raise InvalidArgument(
                f"no live extent at offset {offset}",
                reason="BAD_FREE",
                metadata={"offset": offset},
            )
        i = bisect.bisect_left(self._free, (offset, 0))
        start, end = offset, offset + size
        if i < len(self._free) and self._free[i][0] == end:  # merge with the next
            end += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:  # merge with the previous
            i -= 1
            start = self._free.pop(i)[0]
        self._free.insert(i, (start, end - start))
        return size

    def free_extents(self) -> list[tuple[int, int]]:
        """(offset, size) of every free extent, by offset (for tests and diagnostics)."""
        return list(self._free)
