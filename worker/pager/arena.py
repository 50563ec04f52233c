"""Arenas: fixed virtual address ranges whose physical memory can be released and brought back.

An `Arena` reserves `nbytes` of address space once, when it is created. `map()` backs the whole
range with physical memory in large handles; `unmap()` releases all of it while the range stays
reserved; a later `map()` brings memory back at exactly the same addresses. Tensors are views
at fixed offsets (`tensor()`), so every pointer that was handed out (to a CUDA graph, to
torch's allocator, to a kernel argument) is the same after a suspend and resume.

Alignment rules:
- The reservation starts at a multiple of the backend's granularity (CUDA: the RECOMMENDED
  allocation granularity, 2 MiB on Hopper; CPU: the page size unless configured) and `nbytes`
  is rounded up to a multiple of it.
- Physical memory comes in handles of `handle_bytes` (default 512 MiB), rounded up to the
  granularity; the last handle covers the rest and may be smaller. Large handles map fast:
  4 GiB in 2 MiB / 64 MiB / 1 GiB handles mapped in 84 / 3.1 / 0.4 ms on an H100.
- A tensor's offset must be a multiple of its dtype's size (checked). Kernels want more: lay
  tensors out at multiples of 256 bytes (the engine's Layout does that; the arena does not).

Validity: a tensor taken from an arena is a raw view. It is valid only while the arena is
mapped. After `unmap()` the range is inaccessible (the CPU backend makes it PROT_NONE, so a
touch is a segmentation fault; on CUDA an illegal address), and after `close()` the addresses
may be reused. Keep the views, do not touch them while suspended: after `map()` they are valid
again. `tensor()` itself refuses to make a view of an arena that is not mapped.

Contents: `map()` gives memory of unspecified contents (on the CPU a fresh memfd reads zeros;
on CUDA it may hold anything). `map(zero=True)` or `zero_()` guarantee zeros: the KV arena uses
that so that nothing of another tenant leaks through recycled memory.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from torpor.errors import FailedPrecondition, Internal, InvalidArgument, TorporError
from torpor.log import get_logger
from torpor.worker.pager.backend import (
    Allocation,
    MemoryBackend,
    Reservation,
    check_positive,
    round_up,
)

DEFAULT_HANDLE_BYTES = 512 * 1024 * 1024

_log = get_logger("pager")


class ArenaState(enum.Enum):
    """Where an arena is in its life: it is created UNMAPPED and ends CLOSED."""

    UNMAPPED = "unmapped"
    MAPPED = "mapped"
    PARTIAL = "partial"  # some handles mapped: an exchange swap moves it handle by handle
    CLOSED = "closed"


@dataclass
class _Handle:
    """One physical allocation of the arena and whether it is mapped at its offset now."""

    offset: int
    allocation: Allocation
    mapped: bool = False


class Arena:
    """A named address range of fixed size with a releasable, chunked physical mapping.

    Create it (this reserves the range), `map()` it, take `tensor()` views, and `unmap()` /
    `map()` it as the runtime is suspended and resumed; `close()` (or leaving a `with` block)
    releases everything. Pass `address` to ask for the range a snapshot manifest recorded;
    `address_honored` says whether it was obtained.
    """

    def __init__(
        self,
        name: str,
        nbytes: int,
        backend: MemoryBackend,
        *,
        handle_bytes: int = DEFAULT_HANDLE_BYTES,
        address: int | None = None,
    ) -> None:
        check_positive("nbytes", nbytes)
        check_positive("handle_bytes", handle_bytes)
        granularity = backend.granularity()
        self._name = name
        self._backend = backend
        self._nbytes = round_up(nbytes, granularity)
        self._handle_bytes = min(round_up(handle_bytes, granularity), self._nbytes)
        self._reservation: Reservation = backend.reserve(self._nbytes, address=address)
        self._handles: list[_Handle] = []
        self._state = ArenaState.UNMAPPED
        # Map, unmap and close may come from a worker thread while another thread reads state.
        self._lock = threading.RLock()
        _log.debug(
            "arena_reserved",
            arena=name,
            address=hex(self.address),
            nbytes=self._nbytes,
            requested=None if address is None else hex(address),
            honored=self.address_honored,
        )

    # -- what it is ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> MemoryBackend:
        return self._backend

    @property
    def device(self) -> torch.device:
        return self._backend.device

    @property
    def address(self) -> int:
        """The first byte of the range; the same for the arena's whole life."""
        return self._reservation.address

    @property
    def nbytes(self) -> int:
        """The size of the range (the requested size rounded up to the granularity)."""
        return self._nbytes

    @property
    def handle_bytes(self) -> int:
        return self._handle_bytes

    @property
    def requested_address(self) -> int | None:
        """The address asked for at creation (from a snapshot manifest), if any."""
        return self._reservation.requested

    @property
    def address_honored(self) -> bool:
        """True when the arena sits at `requested_address` (or none was asked for)."""
        return self._reservation.honored

    @property
    def state(self) -> ArenaState:
        return self._state

    @property
    def is_mapped(self) -> bool:
        return self._state is ArenaState.MAPPED

    @property
    def mapped_bytes(self) -> int:
        """Bytes of physical memory mapped now (all of `nbytes` when MAPPED)."""
        return sum(h.allocation.nbytes for h in self._handles if h.mapped)

    def handle_mapped(self, index: int) -> bool:
        """Whether handle `index` (of `handle_extents()`) is mapped now."""
        offset, _ = self.handle_extents()[index]
        return any(h.offset == offset and h.mapped for h in self._handles)

    def handle_extents(self) -> list[tuple[int, int]]:
        """(offset, nbytes) of each physical handle, in address order."""
        return [
            (offset, min(self._handle_bytes, self._nbytes - offset))
            for offset in range(0, self._nbytes, self._handle_bytes)
        ]

    def __repr__(self) -> str:
        return (
            f"Arena({self._name!r}, address={self.address:#x}, nbytes={self._nbytes}, "
            f"state={self._state.value})"
        )

    # -- the verbs ----------------------------------------------------------------------------

    def map(self, *, zero: bool = False) -> None:
        """Back the whole range with physical memory, at the same addresses as before.

        Transactional: if any step fails, the handles created so far are unmapped and
        released, the arena stays UNMAPPED (its range still reserved), and the error is
        raised. `zero=True` then fills the arena with zeros.
        """
        self._map_each(self._backend.create, zero=zero)

    def adopt(self, allocations: Sequence[Allocation]) -> None:
        """Map allocations made elsewhere (exported by another process and adopted by this
        backend), one per handle extent and of its size, instead of creating new ones; the
        arena owns them from here on, and releases them at `unmap`. Transactional like `map`;
        on an error, what was not mapped yet is released too."""
        extents = self.handle_extents()
        sizes = [a.nbytes for a in allocations]
        if sizes != [n for _, n in extents]:
            for allocation in allocations:
                with contextlib.suppress(TorporError):
                    self._backend.release(allocation)
            raise InvalidArgument(
                f"arena {self._name!r} needs handles of {[n for _, n in extents]} bytes, "
                f"got {sizes}",
                reason="BAD_HANDLES",
                metadata={"arena": self._name, "handles": len(sizes)},
            )
        pending = iter(allocations)
        try:
            self._map_each(lambda _: next(pending))
        finally:
            for allocation in pending:  # those not mapped when a map failed
                with contextlib.suppress(TorporError):
                    self._backend.release(allocation)

    def _map_each(self, source: Callable[[int], Allocation], *, zero: bool = False) -> None:
        with self._lock:
            self._require(ArenaState.UNMAPPED, "map")
            if self._handles:  # left over by an unmap whose release failed: retry first
                self._release_handles()
            started = time.perf_counter()
            try:
                for offset, nbytes in self.handle_extents():
                    handle = _Handle(offset, source(nbytes))
                    self._handles.append(handle)
                    self._backend.map(self.address + offset, handle.allocation)
                    handle.mapped = True
                self._backend.set_access(self.address, self._nbytes)
            except BaseException:
                self._release_handles()
                raise
            self._state = ArenaState.MAPPED
            if zero:
                self.zero_()
            _log.debug(
                "arena_mapped",
                arena=self._name,
                nbytes=self._nbytes,
                handles=len(self._handles),
                zeroed=zero,
                ms=round((time.perf_counter() - started) * 1e3, 3),
            )

    def map_handle(self, index: int) -> int:
        """Back handle `index` alone (an exchange swap fills an arena handle by handle, as
        the other runtime gives memory back); the arena is PARTIAL until every handle is
        mapped, then MAPPED. Returns the handle's bytes. Transactional for that handle."""
        with self._lock:
            if self._state not in (ArenaState.UNMAPPED, ArenaState.PARTIAL):
                self._require(ArenaState.UNMAPPED, "map_handle")
            offset, nbytes = self.handle_extents()[index]
            if any(h.offset == offset for h in self._handles):
                raise FailedPrecondition(
                    f"arena {self._name!r}: handle {index} is mapped already",
                    reason="HANDLE_MAPPED",
                    metadata={"arena": self._name, "handle": index},
                )
            handle = _Handle(offset, self._backend.create(nbytes))
            try:
                self._backend.map(self.address + offset, handle.allocation)
                handle.mapped = True
                self._backend.set_access(self.address + offset, nbytes)
            except BaseException:
                with contextlib.suppress(TorporError):
                    if handle.mapped:
                        self._backend.unmap(self.address + offset, nbytes)
                    self._backend.release(handle.allocation)
                raise
            self._handles.append(handle)
            self._handles.sort(key=lambda h: h.offset)
            self._settle_state()
            return nbytes

    def unmap_handle(self, index: int) -> int:
        """Release handle `index` alone (waiting for the device first); the arena is PARTIAL
        until none is left, then UNMAPPED. Returns the handle's bytes."""
        with self._lock:
            if self._state not in (ArenaState.MAPPED, ArenaState.PARTIAL):
                self._require(ArenaState.MAPPED, "unmap_handle")
            offset, nbytes = self.handle_extents()[index]
            handle = next((h for h in self._handles if h.offset == offset), None)
            if handle is None:
                raise FailedPrecondition(
                    f"arena {self._name!r}: handle {index} is not mapped",
                    reason="HANDLE_UNMAPPED",
                    metadata={"arena": self._name, "handle": index},
                )
            self._backend.synchronize()
            if handle.mapped:
                self._backend.unmap(self.address + offset, nbytes)
                handle.mapped = False
            self._backend.release(handle.allocation)
            self._handles.remove(handle)
            self._settle_state()
            return nbytes

    def handle_view(self, index: int) -> torch.Tensor:
        """A uint8 view of handle `index` alone, which must be mapped (the arena may be
        PARTIAL, where `tensor()` refuses)."""
        if not self.handle_mapped(index):
            raise FailedPrecondition(
                f"arena {self._name!r}: handle {index} is not mapped",
                reason="HANDLE_UNMAPPED",
                metadata={"arena": self._name, "handle": index},
            )
        offset, nbytes = self.handle_extents()[index]
        return self._backend.view(self.address + offset, nbytes)

    def _settle_state(self) -> None:
        mapped = sum(1 for h in self._handles if h.mapped)
        if mapped == len(self.handle_extents()):
            self._state = ArenaState.MAPPED
        else:
            self._state = ArenaState.PARTIAL if mapped else ArenaState.UNMAPPED

    def export(self, nbytes: int | None = None) -> list[tuple[int, int]]:
        """(file descriptor, bytes) for each mapped handle that holds the first `nbytes`
        (default: all), for another process to `adopt`; the caller closes them."""
        with self._lock:
            self._require(ArenaState.MAPPED, "export")
            n = self._nbytes if nbytes is None else nbytes
            exported: list[tuple[int, int]] = []
            try:
                for handle in self._handles:
                    if handle.offset < n:
                        fd = self._backend.export(handle.allocation)
                        exported.append((fd, handle.allocation.nbytes))
            except BaseException:
                for fd, _ in exported:
                    os.close(fd)
                raise
            return exported

    def unmap(self) -> None:
        """Release all physical memory; the range stays reserved for a later `map()`.

        Waits for device work first, since kernels may still be reading the arena.
        """
        with self._lock:
            if self._state is not ArenaState.PARTIAL:
                self._require(ArenaState.MAPPED, "unmap")
            started = time.perf_counter()
            self._backend.synchronize()
            self._state = ArenaState.UNMAPPED
            self._release_handles()
            _log.debug(
                "arena_unmapped",
                arena=self._name,
                nbytes=self._nbytes,
                ms=round((time.perf_counter() - started) * 1e3, 3),
            )

    def tensor(self, offset: int, shape: int | Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zero-copy view of the arena: `data_ptr()` is exactly `address + offset`.

        Valid only while the arena is mapped (see the module docstring). A shape with no
        elements gives an ordinary empty tensor, since zero bytes have no address.
        """
        dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        nbytes = math.prod(dims) * dtype.itemsize
        self._require(ArenaState.MAPPED, "tensor")
        if (
            offset < 0
            or offset % dtype.itemsize
            or offset + nbytes > self._nbytes
            or min(dims, default=0) < 0
        ):
            raise InvalidArgument(
                f"arena {self._name!r}: a {dtype} view of shape {dims} at offset {offset} "
                f"does not fit {self._nbytes} bytes at {dtype.itemsize}-byte alignment",
                reason="BAD_VIEW",
                metadata={"arena": self._name, "offset": offset, "shape": dims, "dtype": dtype},
            )
        if nbytes == 0:
            return torch.empty(dims, dtype=dtype, device=self.device)
        raw = self._backend.view(self.address + offset, nbytes)  # [nbytes] uint8
        return raw.view(dtype).view(dims)

    def zero_(self) -> None:
        """Fill the whole arena with zeros (on CUDA, ordered on the current stream)."""
        self.tensor(0, (self._nbytes,), torch.uint8).zero_()

    def close(self) -> None:
        """Release the physical memory and the reservation. Idempotent."""
        with self._lock:
            if self._state is ArenaState.CLOSED:
                return
            if self._state in (ArenaState.MAPPED, ArenaState.PARTIAL):
                self._backend.synchronize()
            self._state = ArenaState.UNMAPPED
            self._release_handles()
            self._backend.free(self._reservation)
            self._state = ArenaState.CLOSED
            _log.debug("arena_closed", arena=self._name, nbytes=self._nbytes)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _require(self, state: ArenaState, verb: str) -> None:
        if self._state is not state:
            raise FailedPrecondition(
                f"arena {self._name!r} is {self._state.value}; {verb}() needs it {state.value}",
                reason=f"ARENA_{self._state.name}",
                metadata={"arena": self._name, "state": self._state.value, "verb": verb},
            )

    def _release_handles(self) -> None:
        """Unmap and release every handle held, last first; keep those that fail for a retry.

        Raises Internal (chained to the first failure) if anything could not be released.
        """
        kept: list[_Handle] = []
        failures: list[TorporError] = []
        for handle in reversed(self._handles):
            try:
                if handle.mapped:
                    self._backend.unmap(self.address + handle.offset, handle.allocation.nbytes)
                    handle.mapped = False
                self._backend.release(handle.allocation)
            except TorporError as e:
                kept.append(handle)
                failures.append(e)
        self._handles = kept[::-1]
        if failures:
            raise Internal(
                f"arena {self._name!r}: {len(failures)} handle(s) could not be released "
                f"(first: {failures[0]})",
                reason="ARENA_RELEASE_FAILED",
                metadata={"arena": self._name, "failed": len(failures)},
            ) from failures[0]
