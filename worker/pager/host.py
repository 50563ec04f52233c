"""Retained host buffers: the host-RAM copy of an arena's bytes (the weights' host tier).

Weights never change after load, so their host copy is made once, right after load and off
the eviction path; every later suspend only unmaps the weights arena, and every resume copies
the buffer back (`copy_to`). On CUDA the buffer is page-locked so that copies run at DMA speed
(about 55 GB/s measured, against 8 GB/s from pageable memory). Pinning itself is slow (about
1.9 GB/s), which is why the buffer is retained and never re-pinned.

The memory is an anonymous mmap pinned with `cuMemHostRegister`, not `torch.empty(...,
pin_memory=True)`: torch's pinned-memory caching allocator rounds every request up to the next
power of two, so a 66 GiB buffer would pin 128 GiB.

It is pinned in pieces (`PIN_PIECE`), each its own registration, and copies run piece by
piece. Registering holds a driver lock for as long as it takes: measured on an H200, a
request that arrived just after a disk resume (which starts the host copy again in the
background) waited 3.1 to 3.7 s for its first token, its kernel launches queued behind the
registrations. In pieces, with the background copy waiting while the runtime serves
(`before_piece`), a request waits for one piece at most.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import torch

from torpor.errors import FailedPrecondition, InvalidArgument, TorporError
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.backend import check_positive, round_up
from torpor.worker.pager.cpu import (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ_WRITE,
    host_view,
    os_error,
    sys_madvise,
    sys_mmap,
    sys_munmap,
)

PIN_PIECE = 128 << 20
"""Bytes per page-locked registration (about 25 ms of pinning each)."""
MADV_DONTNEED = 4
MADV_REMOVE = 9  # frees a shared (memfd) mapping's backing pages too
POPULATE_THREADS = 8
POPULATE_SLICE = 256 << 20
MADV_POPULATE_WRITE = 23  # Linux 5.14


class Stage(Protocol):
    """Copies `spans` ((offset, nbytes) pairs) of a host tensor that is not page-locked to
    the same offsets of a device tensor, through pinned staging buffers; returns when done."""

    def __call__(
        self, src: torch.Tensor, dst: torch.Tensor, spans: Sequence[tuple[int, int]]
    ) -> None: ...


@runtime_checkable
class HostPinner(Protocol):
    """A backend that can page-lock host memory (the CUDA backend)."""

    def pin_host(self, address: int, nbytes: int) -> None: ...

    def unpin_host(self, address: int) -> None: ...


class HostBuffer:
    """A host-memory buffer of fixed size, pinned when the arena it serves is on a GPU.

    Allocate it ahead of time with `for_arena`, fill it once with `copy_from(arena)`, and
    restore the arena from it with `copy_to(arena)` as often as needed. `close()` unpins and
    frees it (idempotent); views of `tensor` must not be used after that.
    """

    def __init__(
        self,
        nbytes: int,
        *,
        pinner: HostPinner | None = None,
        pin_piece: int = PIN_PIECE,
        before_piece: Callable[[], None] | None = None,
        shared: bool = False,
        fd: int | None = None,
        lazy: bool = False,
    ) -> None:
        """`before_piece` is called before each piece is pinned: a background copy passes
        a wait-while-serving there, so the driver lock each registration takes never sits
        in front of a request's kernel launches.

        `shared` puts the bytes in a memfd that `share` hands to another process (the
        keeper); `fd` maps such a descriptor, made by another process, instead of new memory
        (the buffer owns it from here on).

        `lazy` maps the range and nothing more: no page is faulted in or locked until `hold`
        takes a span (an exchange swap fills its new copy span by span, as host RAM is freed
        by the other runtime)."""
        check_positive("nbytes", nbytes)
        check_positive("pin_piece", pin_piece)
        self._nbytes = nbytes
        self._mapped_bytes = round_up(nbytes, mmap.PAGESIZE)
        self._fd = _memfd(self._mapped_bytes, fd) if shared or fd is not None else None
        try:
            self._address = (
                sys_mmap(0, self._mapped_bytes, PROT_READ_WRITE, MAP_SHARED, self._fd)
                if self._fd is not None
                else sys_mmap(0, self._mapped_bytes, PROT_READ_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
            )
        except BaseException:
            if self._fd is not None:
                os.close(self._fd)
            raise
        piece = round_up(pin_piece, mmap.PAGESIZE)
        self._pieces = [
            (offset, min(piece, self._mapped_bytes - offset))
            for offset in range(0, self._mapped_bytes, piece)
        ]
        self._pinner = pinner
        self._pinned = [False] * len(self._pieces)  # per piece: registered now
        # Spans (offset, end) whose pages are not held: all of a lazy buffer at first, and
        # what `free` gave back.
        self._absent: list[tuple[int, int]] = [(0, nbytes)] if lazy else []
        try:
            self._advise_huge_pages()
            if fd is None and pinner is not None and not lazy:  # fresh memory, to be pinned
                populate(self._address, self._mapped_bytes)
            if not lazy:
                self.pin(before_piece)
        except BaseException:
            self.unpin()
            sys_munmap(self._address, self._mapped_bytes)
            if self._fd is not None:
                os.close(self._fd)
            raise
        self._tensor: torch.Tensor | None = host_view(self._address, nbytes)
        self._stream: Any = None

    @classmethod
    def for_arena(
        cls,
        arena: Arena,
        nbytes: int | None = None,
        before_piece: Callable[[], None] | None = None,
        shared: bool = False,
    ) -> HostBuffer:
        """A buffer for the first `nbytes` (default: all) of `arena`, pinned on CUDA."""
        backend = arena.backend
        pinner = backend if isinstance(backend, HostPinner) else None
        size = arena.nbytes if nbytes is None else nbytes
        return cls(size, pinner=pinner, before_piece=before_piece, shared=shared)

    def _advise_huge_pages(self) -> None:
        # Huge pages mean 512× fewer pages for the driver to pin and to walk during DMA.
        # Advisory only: kernels built without transparent huge pages answer EINVAL.
        with contextlib.suppress(TorporError):
            sys_madvise(self._address, self._mapped_bytes, MADV_HUGEPAGE)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def address(self) -> int:
        return self._address

    @property
    def shared(self) -> bool:
        """Whether the bytes are in a memfd that `share` can hand to another process."""
        return self._fd is not None

    def share(self) -> int:
        """A new descriptor of the buffer's memfd, for another process (the caller closes
        it); FailedPrecondition unless the buffer was made `shared`."""
        if self._fd is None or self._tensor is None:
            raise FailedPrecondition(
                "only an open buffer made with shared=True can be shared",
                reason="HOST_BUFFER_NOT_SHARED",
            )
        return os.dup(self._fd)

    @property
    def pinned(self) -> bool:
        """Whether every piece is page-locked (never, without a pinner)."""
        return self._pinner is not None and all(self._pinned) and not self._absent

    @property
    def held_bytes(self) -> int:
        """Bytes whose pages the buffer holds: `nbytes` less what is absent (lazy, or freed)."""
        return self._nbytes - sum(end - start for start, end in self._absent)

    @property
    def whole(self) -> bool:
        """Whether every byte is held (nothing absent)."""
        return not self._absent

    def locked(self, offset: int, nbytes: int) -> bool:
        """Whether every piece over [offset, offset + nbytes) is page-locked (never, without
        a pinner)."""
        if self._pinner is None:
            return False
        return all(self._pinned[i] for i in self._pieces_over(offset, offset + nbytes))

    def holds(self, offset: int, nbytes: int) -> bool:
        """Whether every byte of [offset, offset + nbytes) is held."""
        return not any(a < offset + nbytes and offset < b for a, b in self._absent)

    def hold(self, offset: int, nbytes: int, *, lock: bool = True) -> None:
        """Take pages for the span [offset, offset + nbytes), which must be absent: fault
        them in and, with a pinner and `lock`, lock each piece that is now wholly held
        (`pin` locks the others later)."""
        end = self._check_span(offset, nbytes)
        if not any(a <= offset and end <= b for a, b in self._absent):
            raise FailedPrecondition(
                f"host buffer span [{offset}, {end}) is held already",
                reason="HOST_SPAN_HELD",
                metadata={"offset": offset, "nbytes": nbytes},
            )
        start, stop = _page_span(offset, end, self._mapped_bytes)
        populate(self._address + start, stop - start)
        self._absent = _carve(self._absent, offset, end)
        if self._pinner is not None and lock:
            for i in self._pieces_over(offset, end):
                piece_offset, size = self._pieces[i]
                if not self._pinned[i] and self.holds(
                    piece_offset, min(size, self._nbytes - piece_offset)
                ):
                    self._pinner.pin_host(self._address + piece_offset, size)
                    self._pinned[i] = True

    def free(self, offset: int, nbytes: int) -> None:
        """Give the pages of [offset, offset + nbytes) back to the kernel; the bytes are gone,
        the range stays mapped for `hold`. Every locked piece it touches is unlocked first
        (bytes of such a piece outside the span stay, unlocked: copied at pageable speed)."""
        end = self._check_span(offset, nbytes)
        for i in self._pieces_over(offset, end):
            if self._pinned[i] and self._pinner is not None:
                self._pinner.unpin_host(self._address + self._pieces[i][0])
                self._pinned[i] = False
        start, stop = _page_span(offset, end, self._mapped_bytes)
        sys_madvise(self._address + start, stop - start, MADV_REMOVE if self._fd else MADV_DONTNEED)
        self._absent = _merge([*_carve(self._absent, offset, end), (offset, end)])

    def _check_span(self, offset: int, nbytes: int) -> int:
        end = offset + nbytes
        if self._tensor is None:
            raise FailedPrecondition("host buffer is closed", reason="HOST_BUFFER_CLOSED")
        if offset < 0 or nbytes <= 0 or end > self._nbytes or offset % mmap.PAGESIZE:
            raise InvalidArgument(
                f"span [{offset}, {end}) is not a page-aligned span of a {self._nbytes}-byte "
                "host buffer",
                reason="BAD_COPY_SIZE",
                metadata={"offset": offset, "nbytes": nbytes},
            )
        return end

    def _pieces_over(self, offset: int, end: int) -> list[int]:
        """The pieces that overlap [offset, end)."""
        return [
            i
            for i, (p_offset, size) in enumerate(self._pieces)
            if p_offset < end and offset < p_offset + size
        ]

    @property
    def lockable(self) -> bool:
        """Whether the buffer has a pinner (a CUDA arena): whether `pin` does anything."""
        return self._pinner is not None

    @property
    def pinned_bytes(self) -> int:
        return sum(size for (_, size), on in zip(self._pieces, self._pinned, strict=True) if on)

    def pin(self, before_piece: Callable[[], None] | None = None) -> None:
        """Page-lock every piece not locked yet (no-op without a pinner). `before_piece` runs
        before each one and may raise to stop (the pieces done so far stay locked)."""
        if self._pinner is None:
            return
        for i, (offset, size) in enumerate(self._pieces):
            if self._pinned[i] or any(a < offset + size and offset < b for a, b in self._absent):
                continue  # locked already, or its pages were given back (`free`)
            if before_piece is not None:
                before_piece()
            self._pinner.pin_host(self._address + offset, size)
            self._pinned[i] = True

    def unpin(self) -> None:
        """Unlock every piece; the bytes stay. Deep suspend does this before the driver's
        checkpoint, whose cost grows with the page-locked memory of the process (about
        25 ms per GB each way, measured on an H200), and `pin` locks them again later."""
        if self._pinner is None:
            return
        for i, (offset, _) in enumerate(self._pieces):
            if self._pinned[i]:
                self._pinner.unpin_host(self._address + offset)
                self._pinned[i] = False

    @property
    def tensor(self) -> torch.Tensor:
        """The buffer as a uint8 CPU tensor of `nbytes` (a view, not a copy)."""
        if self._tensor is None:
            raise FailedPrecondition("host buffer is closed", reason="HOST_BUFFER_CLOSED")
        return self._tensor

    def copy_from(self, arena: Arena, nbytes: int | None = None) -> None:
        """Copy the first `nbytes` (default: the buffer's size) of a mapped arena into the buffer.

        Waits for work queued on the current stream first (the arena may just have been filled).
        """
        n = self._span(arena, nbytes)
        dst, src = self.tensor[:n], arena.tensor(0, (n,), torch.uint8)
        self._copy(dst, src, arena.device, self._spans(n))

    def copy_to(self, arena: Arena, nbytes: int | None = None, stage: Stage | None = None) -> None:
        """Copy the first `nbytes` (default: the buffer's size) of the buffer into a mapped arena.

        Pieces that are not page-locked (after `unpin`) go through `stage`, pinned staging
        buffers, while the locked ones are copied directly, at the same time. Returns when the
        bytes are in the arena.
        """
        n = self._span(arena, nbytes)
        dst, src = arena.tensor(0, (n,), torch.uint8), self.tensor[:n]
        pieces = self._spans(n)
        locked = [p for p, on in zip(pieces, self._pinned, strict=False) if on]
        loose = [p for p, on in zip(pieces, self._pinned, strict=False) if not on]
        if self._pinner is None or not loose:
            self._copy(dst, src, arena.device, pieces)
            return
        if stage is None:
            raise FailedPrecondition(
                "the host copy is not page-locked and no staging buffers were given",
                reason="HOST_COPY_NOT_PINNED",
            )
        self._copy(dst, src, arena.device, locked, wait=False)  # meanwhile, on a side stream
        stage(src, dst, loose)
        if self._stream is not None:
            self._stream.synchronize()

    def copy_to_streamed(self, arena: Arena, nbytes: int | None = None) -> list[tuple[int, Any]]:
        """Enqueue the copy of the first `nbytes` into a mapped CUDA arena, piece by piece in
        order, and return at once with (bytes copied from the start, CUDA event) before the
        first piece and after each one, for a `WeightsGate`; the events time the copy too.
        Every piece must be page-locked."""
        n = self._span(arena, nbytes)
        if arena.device.type != "cuda" or not self.pinned:
            raise FailedPrecondition(
                "a streamed copy needs a page-locked copy and a CUDA arena",
                reason="HOST_COPY_NOT_PINNED",
            )
        marks: list[tuple[int, Any]] = []
        dst, src = arena.tensor(0, (n,), torch.uint8), self.tensor[:n]
        self._copy(dst, src, arena.device, self._spans(n), wait=False, marks=marks)
        return marks

    def _span(self, arena: Arena, nbytes: int | None) -> int:
        n = self._nbytes if nbytes is None else nbytes
        if n <= 0 or n > self._nbytes or n > arena.nbytes:
            raise InvalidArgument(
                f"cannot copy {n} bytes between a {self._nbytes}-byte host buffer and arena "
                f"{arena.name!r} of {arena.nbytes} bytes",
                reason="BAD_COPY_SIZE",
                metadata={"nbytes": n, "buffer": self._nbytes, "arena": arena.nbytes},
            )
        return n

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """The pieces that hold the first `n` bytes, as (offset, nbytes), the last one cut."""
        return [(offset, min(size, n - offset)) for offset, size in self._pieces if offset < n]

    def _copy(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        device: torch.device,
        spans: Sequence[tuple[int, int]],
        wait: bool = True,
        marks: list[tuple[int, Any]] | None = None,
    ) -> None:
        """Copy `spans` of `src` to `dst`; with `wait`, return when they are copied. On CUDA,
        `marks` gets (end of the span, event recorded after it) for each span."""
        if device.type != "cuda":
            for offset, size in spans:
                dst[offset : offset + size].copy_(src[offset : offset + size])
            return
        # A dedicated stream keeps the copy off the compute stream's queue; it first waits for
        # what is already queued there, and the host waits for the copy before returning.
        # One copy per pinned piece: a copy whose host side spans two registrations is not
        # guaranteed the page-locked path.
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            if marks is not None:
                marks.append((0, _recorded()))  # the start, for timing the whole copy
            for offset, size in spans:
                dst[offset : offset + size].copy_(src[offset : offset + size], non_blocking=True)
                if marks is not None:
                    marks.append((offset + size, _recorded()))
        if wait:
            self._stream.synchronize()

    def close(self) -> None:
        """Unpin and free the buffer. Idempotent."""
        if self._tensor is None:
            return
        self.unpin()
        self._pinner = None
        sys_munmap(self._address, self._mapped_bytes)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tensor = None

    def __enter__(self) -> HostBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostBuffer(nbytes={self._nbytes}, pinned={self.pinned})"


def populate(address: int, nbytes: int, threads: int = POPULATE_THREADS) -> None:
    """Fault in every page of a fresh mapping, `threads` slices at a time. Pinning does it
    otherwise, one page at a time in one thread: making a 72 GB host copy took 46 s, nearly
    all of it in `cuMemHostRegister`, on an H200 host (1.6 GB/s). The memory must be fresh:
    on kernels without MADV_POPULATE_WRITE (before 5.14) the pages are touched by writing
    zeros."""

    def one(span: tuple[int, int]) -> None:
        start, n = span
        try:
            sys_madvise(start, n, MADV_POPULATE_WRITE)
        except TorporError:
            ctypes.memset(start, 0, n)

    spans = [
        (address + offset, min(POPULATE_SLICE, nbytes - offset))
        for offset in range(0, nbytes, POPULATE_SLICE)
    ]
    if len(spans) <= 1:
        for span in spans:
            one(span)
        return
    with ThreadPoolExecutor(min(threads, len(spans)), thread_name_prefix="populate") as pool:
        list(pool.map(one, spans))


def _page_span(offset: int, end: int, limit: int) -> tuple[int, int]:
    """[offset, end) widened to whole pages (end: at most `limit`, the mapping's size)."""
    return offset, min(round_up(end, mmap.PAGESIZE), limit)


def _carve(spans: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """`spans` less [start, end)."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _memfd(nbytes: int, fd: int | None) -> int:
    """A memfd of `nbytes` (made, or `fd` checked to hold that many; closed on error)."""
    try:
        if fd is None:
            fd = os.memfd_create("torpor-host-copy", os.MFD_CLOEXEC)
            os.ftruncate(fd, nbytes)
        elif os.fstat(fd).st_size < nbytes:
            raise InvalidArgument(
                f"the host copy's descriptor holds {os.fstat(fd).st_size} bytes, not {nbytes}",
                reason="BAD_HANDLE_SIZE",
                metadata={"nbytes": nbytes},
            )
    except OSError as e:
        if fd is not None:
            os.close(fd)
        raise os_error("memfd", e.errno or 0, nbytes=nbytes) from e
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return fd


def _recorded() -> Any:
    """A timing CUDA event recorded now on the current stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
