"""The CPU memory backend: arena semantics with mmap and memfd, for hosts without a GPU.

It mirrors CUDA VMM one to one, so the arena logic and its tests run everywhere:

| CUDA VMM                 | here                                                             |
| ------------------------ | ---------------------------------------------------------------- |
| cuMemAddressReserve      | mmap(PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)         |
| cuMemCreate              | memfd_create + ftruncate (pages are allocated when touched)      |
| cuMemMap                 | mmap(MAP_SHARED|MAP_FIXED, memfd) over the reserved range        |
| cuMemSetAccess           | mprotect(PROT_READ|PROT_WRITE)                                   |
| cuMemUnmap               | mmap(PROT_NONE, MAP_FIXED|MAP_ANONYMOUS|MAP_NORESERVE) back over |
| cuMemRelease             | close(memfd): its pages are freed once nothing maps them         |
| cuMemAddressFree         | munmap                                                           |

One difference: a memfd allocates its pages lazily, on first touch, where cuMemCreate commits
them at once; a fresh memfd always reads as zeros. Every libc call is checked and its errno
turned into a `TorporError` with the errno name as `reason`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import torch

from torpor.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TorporError,
)
from torpor.worker.pager.backend import Allocation, Reservation, round_up

# Linux values; the same on x86-64 and arm64 (the `mmap` module lacks some of them).
PROT_NONE = 0x0
PROT_READ_WRITE = 0x1 | 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FIXED_NOREPLACE = 0x100000  # Linux ≥ 4.17; older kernels treat the address as a hint
MADV_HUGEPAGE = 14
MADV_DONTDUMP = 16

_RESERVE_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
for _name in ("munmap", "mprotect", "madvise"):
    getattr(_libc, _name).restype = ctypes.c_int
    getattr(_libc, _name).argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_BY_ERRNO: dict[int, type[TorporError]] = {
    errno.ENOMEM: ResourceExhausted,
    errno.EMFILE: ResourceExhausted,
    errno.ENFILE: ResourceExhausted,
    errno.EEXIST: AlreadyExists,
    errno.EPERM: FailedPrecondition,
    errno.EACCES: FailedPrecondition,
}


def os_error(call: str, err: int, **values: object) -> TorporError:
    """The typed error for a failed system call: reason is the errno name (e.g. ENOMEM)."""
    name = errno.errorcode.get(err, f"ERRNO_{err}")
    cls = _BY_ERRNO.get(err, Internal)
    shown = ", ".join(f"{k}={_show(v)}" for k, v in values.items())
    return cls(
        f"{call}({shown}) failed: {name} ({os.strerror(err)})",
        reason=name,
        metadata={"call": call, "errno": name, **{k: _show(v) for k, v in values.items()}},
    )


def _show(value: object) -> str:
    # Addresses read best in hex; sizes and flags in decimal are fine.
    return hex(value) if isinstance(value, int) and value > 1 << 32 else str(value)


def sys_mmap(address: int, nbytes: int, prot: int, flags: int, fd: int = -1) -> int:
    """mmap(2); the mapped address, or a TorporError carrying errno."""
    got = _libc.mmap(address or None, nbytes, prot, flags, fd, 0)
    if got is None or got == _MAP_FAILED:
        raise os_error(
            "mmap", ctypes.get_errno(), address=address, nbytes=nbytes, prot=prot, flags=flags
        )
    return int(got)


def sys_munmap(address: int, nbytes: int) -> None:
    """munmap(2), checked."""
    if _libc.munmap(address, nbytes) != 0:
        raise os_error("munmap", ctypes.get_errno(), address=address, nbytes=nbytes)


def sys_mprotect(address: int, nbytes: int, prot: int) -> None:
    """mprotect(2), checked."""
    if _libc.mprotect(address, nbytes, prot) != 0:
        raise os_error("mprotect", ctypes.get_errno(), address=address, nbytes=nbytes, prot=prot)


def sys_madvise(address: int, nbytes: int, advice: int) -> None:
    """madvise(2), checked."""
    if _libc.madvise(address, nbytes, advice) != 0:
        raise os_error("madvise", ctypes.get_errno(), address=address, nbytes=nbytes, advice=advice)


def host_view(address: int, nbytes: int) -> torch.Tensor:
    """A zero-copy uint8 CPU tensor over `nbytes` of process memory at `address`.

    The tensor keeps the ctypes array alive, not the memory: it is valid only while the
    memory stays mapped.
    """
    buffer = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8)


class CpuBackend:
    """`MemoryBackend` over anonymous reservations and memfd-backed physical memory."""

    kind = "cpu"
    device = torch.device("cpu")

    def __init__(self, granularity: int | None = None) -> None:
        page = mmap.PAGESIZE
        granularity = granularity or page
        if granularity <= 0 or granularity % page:
            raise InvalidArgument(
                f"CPU granularity must be a positive multiple of the page size {page}, "
                f"got {granularity}",
                reason="BAD_GRANULARITY",
                metadata={"granularity": granularity, "page_size": page},
            )
        self._granularity = granularity

    def granularity(self) -> int:
        return self._granularity

    def reserve(self, nbytes: int, *, address: int | None = None) -> Reservation:
        if address is not None and address % self._granularity == 0:
            try:
                got = sys_mmap(address, nbytes, PROT_NONE, _RESERVE_FLAGS | MAP_FIXED_NOREPLACE)
            except TorporError:
                pass  # taken (EEXIST) or unusable: fall back to any address, reported below
            else:
                if got == address:
                    return Reservation(got, nbytes, requested=address)
                sys_munmap(got, nbytes)  # an old kernel took the address as a hint only
        return Reservation(self._reserve_aligned(nbytes), nbytes, requested=address)

    def _reserve_aligned(self, nbytes: int) -> int:
        """Reserve anywhere, aligned to the granularity (over-reserve, then trim both ends)."""
        if self._granularity == mmap.PAGESIZE:
            return sys_mmap(0, nbytes, PROT_NONE, _RESERVE_FLAGS)
        padded = nbytes + self._granularity
        raw = sys_mmap(0, padded, PROT_NONE, _RESERVE_FLAGS)
        start = round_up(raw, self._granularity)
        if start > raw:
            sys_munmap(raw, start - raw)
        if raw + padded > start + nbytes:
            sys_munmap(start + nbytes, raw + padded - start - nbytes)
        return start

    def free(self, reservation: Reservation) -> None:
        sys_munmap(reservation.address, reservation.nbytes)

    def create(self, nbytes: int) -> Allocation:
        try:
            fd = os.memfd_create("torpor-arena", os.MFD_CLOEXEC)
        except OSError as e:
            raise os_error("memfd_create", e.errno or 0, nbytes=nbytes) from e
        try:
            os.ftruncate(fd, nbytes)
        except OSError as e:
            os.close(fd)
            raise os_error("ftruncate", e.errno or 0, fd=fd, nbytes=nbytes) from e
        return Allocation(fd, nbytes)

    def export(self, allocation: Allocation) -> int:
        fd = allocation.handle
        assert isinstance(fd, int)
        try:
            return os.dup(fd)
        except OSError as e:
            raise os_error("dup", e.errno or 0, fd=fd) from e

    def adopt(self, fd: int, nbytes: int) -> Allocation:
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise os_error("fstat", e.errno or 0, fd=fd) from e
        if size < nbytes:
            os.close(fd)
            raise InvalidArgument(
                f"the descriptor holds {size} bytes, not the {nbytes} announced",
                reason="BAD_HANDLE_SIZE",
                metadata={"size": size, "nbytes": nbytes},
            )
        return Allocation(fd, nbytes)

    def release(self, allocation: Allocation) -> None:
        fd = allocation.handle
        assert isinstance(fd, int)
        try:
            os.close(fd)
        except OSError as e:
            raise os_error("close", e.errno or 0, fd=fd) from e

    def map(self, address: int, allocation: Allocation) -> None:
        fd = allocation.handle
        assert isinstance(fd, int)
        nbytes = allocation.nbytes
        got = sys_mmap(address, nbytes, PROT_NONE, MAP_SHARED | MAP_FIXED, fd)
        if got != address:
            raise Internal(
                f"mmap(MAP_FIXED) placed memory at {got:#x}, not at {address:#x}",
                reason="MAP_MOVED",
                metadata={"address": hex(address), "got": hex(got)},
            )
        # A crashing worker should not write tens of GiB of arena into a core dump.
        sys_madvise(address, nbytes, MADV_DONTDUMP)

    def set_access(self, address: int, nbytes: int) -> None:
        sys_mprotect(address, nbytes, PROT_READ_WRITE)

    def unmap(self, address: int, nbytes: int) -> None:
        # Mapping fresh PROT_NONE anonymous memory over the range drops the memfd mapping and
        # keeps the addresses reserved in one call (a munmap would open a hole others could take).
        sys_mmap(address, nbytes, PROT_NONE, _RESERVE_FLAGS | MAP_FIXED)

    def synchronize(self) -> None:
        """Nothing runs asynchronously on the CPU backend."""

    def view(self, address: int, nbytes: int) -> torch.Tensor:
        return host_view(address, nbytes)
