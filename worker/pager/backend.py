"""The interface between an arena and the memory it is made of.

A `MemoryBackend` offers the few verbs of virtual-memory management that an arena needs:
reserve an address range, create physical memory, map it into the range, grant access,
unmap it, release it, and free the range. Two implementations exist: `CpuBackend` (mmap and
memfd; every developer machine and CI) and `CudaBackend` (CUDA VMM through
`cuda.bindings.driver`). Both report every failure as a `TorporError` that names the call, the
system's error name (an errno name or a `CUresult` name) and the values passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from torpor.errors import InvalidArgument


@dataclass(frozen=True)
class Reservation:
    """A reserved, inaccessible virtual address range.

    `requested` is the address the caller asked for (None for any); `honored` says whether the
    range starts there. A snapshot records `address` so that a later process can ask for it.
    """

    address: int
    nbytes: int
    requested: int | None = None

    @property
    def honored(self) -> bool:
        """True when a requested address was obtained (and trivially when none was asked)."""
        return self.requested is None or self.requested == self.address


@dataclass(frozen=True)
class Allocation:
    """One physical allocation (a CUDA generic allocation handle, or a memfd on the CPU).

    `handle` is backend-specific and opaque to callers; `nbytes` is a multiple of the
    backend's granularity.
    """

    handle: object
    nbytes: int


@runtime_checkable
class MemoryBackend(Protocol):
    """The verbs of virtual-memory management that an `Arena` is built from.

    Addresses and sizes passed to `map`, `set_access` and `unmap` must be multiples of
    `granularity()` and lie inside a live reservation; the arena guarantees that, so backends
    do not re-check it. Every method raises a `TorporError` on failure and never returns an
    error value.
    """

    #: "cpu" or "cuda": recorded in snapshot manifests and logs.
    kind: str
    #: The torch device that tensors over this backend's memory live on.
    device: torch.device

    def granularity(self) -> int:
        """The unit (bytes) of reservation and mapping sizes, offsets and alignment."""
        ...

    def reserve(self, nbytes: int, *, address: int | None = None) -> Reservation:
        """Reserve `nbytes` of address space, at `address` if it is free, else anywhere."""
        ...

    def free(self, reservation: Reservation) -> None:
        """Give back a reservation; nothing may be mapped in it any more."""
        ...

    def create(self, nbytes: int) -> Allocation:
        """Create a physical allocation of `nbytes` (a multiple of the granularity)."""
        ...

    def release(self, allocation: Allocation) -> None:
        """Release a physical allocation; its memory is freed once it is no longer mapped."""
        ...

    def map(self, address: int, allocation: Allocation) -> None:
        """Map all of `allocation` at `address`, inside a reservation; not yet accessible."""
        ...

    def set_access(self, address: int, nbytes: int) -> None:
        """Make a fully mapped range readable and writable by the device."""
        ...

    def unmap(self, address: int, nbytes: int) -> None:
        """Unmap exactly one earlier `map` (whole allocation); the range stays reserved."""
        ...

    def synchronize(self) -> None:
        """Wait for all device work that may touch mapped memory (before an unmap)."""
        ...

    def view(self, address: int, nbytes: int) -> torch.Tensor:
        """A zero-copy uint8 tensor of `nbytes` at `address`; its data_ptr() is `address`."""
        ...

    def export(self, allocation: Allocation) -> int:
        """A new file descriptor for `allocation` that another process can `adopt` (the
        caller closes it). CUDA: only for a backend made `exportable`."""
        ...

    def adopt(self, fd: int, nbytes: int) -> Allocation:
        """The allocation behind a descriptor that another process exported; takes `fd`
        (closed here, or at `release`). Map and release it like one from `create`."""
        ...


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `value`."""
    return -(-value // multiple) * multiple


def check_positive(name: str, value: int) -> int:
    """`value` when it is a positive int; else InvalidArgument naming `name` and the value."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(
            f"{name} must be a positive number of bytes, got {value!r}",
            reason="BAD_SIZE",
            metadata={name: value},
        )
    return value
