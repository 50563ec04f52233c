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
import mmap
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from torpor.errors import FailedPrecondition, InvalidArgument, TorporError
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.backend import check_positive, round_up
from torpor.worker.pager.cpu import (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ_WRITE,
    host_view,
    sys_madvise,
    sys_mmap,
    sys_munmap,
)

PIN_PIECE = 128 << 20
"""Bytes per page-locked registration (about 25 ms of pinning each)."""


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
    ) -> None:
        """`before_piece` is called before each piece is pinned: a background copy passes
        a wait-while-serving there, so the driver lock each registration takes never sits
        in front of a request's kernel launches."""
        check_positive("nbytes", nbytes)
        check_positive("pin_piece", pin_piece)
        self._nbytes = nbytes
        self._mapped_bytes = round_up(nbytes, mmap.PAGESIZE)
        self._address = sys_mmap(
            0, self._mapped_bytes, PROT_READ_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
        )
        piece = round_up(pin_piece, mmap.PAGESIZE)
        self._pieces = [
            (offset, min(piece, self._mapped_bytes - offset))
            for offset in range(0, self._mapped_bytes, piece)
        ]
        self._pinner: HostPinner | None = None
        self._pinned: list[int] = []  # addresses registered so far
        try:
            self._advise_huge_pages()
            if pinner is not None:
                self._pinner = pinner
                for offset, size in self._pieces:
                    if before_piece is not None:
                        before_piece()
                    pinner.pin_host(self._address + offset, size)
                    self._pinned.append(self._address + offset)
        except BaseException:
            self._unpin()
            sys_munmap(self._address, self._mapped_bytes)
            raise
        self._tensor: torch.Tensor | None = host_view(self._address, nbytes)
        self._stream: Any = None

    @classmethod
    def for_arena(
        cls,
        arena: Arena,
        nbytes: int | None = None,
        before_piece: Callable[[], None] | None = None,
    ) -> HostBuffer:
        """A buffer for the first `nbytes` (default: all) of `arena`, pinned on CUDA."""
        backend = arena.backend
        pinner = backend if isinstance(backend, HostPinner) else None
        size = arena.nbytes if nbytes is None else nbytes
        return cls(size, pinner=pinner, before_piece=before_piece)

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
    def pinned(self) -> bool:
        return bool(self._pinned)

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
        self._copy(self.tensor[:n], arena.tensor(0, (n,), torch.uint8), arena.device)

    def copy_to(self, arena: Arena, nbytes: int | None = None) -> None:
        """Copy the first `nbytes` (default: the buffer's size) of the buffer into a mapped arena.

        Returns when the bytes are in the arena.
        """
        n = self._span(arena, nbytes)
        self._copy(arena.tensor(0, (n,), torch.uint8), self.tensor[:n], arena.device)

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

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:
        if device.type != "cuda":
            dst.copy_(src)
            return
        # A dedicated stream keeps the copy off the compute stream's queue; it first waits for
        # what is already queued there, and the host waits for the copy before returning.
        # One copy per pinned piece: a copy whose host side spans two registrations is not
        # guaranteed the page-locked path.
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        n = dst.numel()
        with torch.cuda.stream(self._stream):
            for offset, size in self._pieces:
                if offset >= n:
                    break
                end = min(offset + size, n)
                dst[offset:end].copy_(src[offset:end], non_blocking=True)
        self._stream.synchronize()

    def close(self) -> None:
        """Unpin and free the buffer. Idempotent."""
        if self._tensor is None:
            return
        self._unpin()
        sys_munmap(self._address, self._mapped_bytes)
        self._tensor = None

    def _unpin(self) -> None:
        while self._pinned:
            assert self._pinner is not None
            self._pinner.unpin_host(self._pinned.pop())
        self._pinner = None

    def __enter__(self) -> HostBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostBuffer(nbytes={self._nbytes}, pinned={self.pinned})"
