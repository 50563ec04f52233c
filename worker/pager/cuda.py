"""The CUDA memory backend: CUDA virtual memory management through `cuda.bindings.driver`.

An arena's range is a `cuMemAddressReserve` reservation; its physical memory is device memory
from `cuMemCreate` (pinned, on this backend's device), mapped with `cuMemMap` and made
accessible with `cuMemSetAccess`. `cuMemUnmap` + `cuMemRelease` give the memory back to the
device while the reservation, and so every address, stays.

`cuda.bindings` is imported on first use, not at import time, so that importing the pager on a
host without a GPU never loads the CUDA driver. Every driver call goes through `check()`, which
turns a failed `CUresult` into a `TorporError` whose `reason` is the CUresult name
(CUDA_ERROR_OUT_OF_MEMORY, ...) and whose metadata holds the call and its values.

Driver calls act on the calling thread's current context. The backend retains the device's
primary context (the one the CUDA runtime, and so torch, uses) and makes it current before
each verb, so arenas may be mapped from any thread. The retained context is never released:
torch shares it for the life of the process.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from torpor.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TorporError,
)
from torpor.worker.pager.backend import Allocation, Reservation

_BY_RESULT: dict[str, type[TorporError]] = {
    "CUDA_ERROR_OUT_OF_MEMORY": ResourceExhausted,
    "CUDA_ERROR_NO_DEVICE": FailedPrecondition,
    "CUDA_ERROR_NOT_SUPPORTED": FailedPrecondition,
    "CUDA_ERROR_NOT_PERMITTED": FailedPrecondition,
    "CUDA_ERROR_INSUFFICIENT_DRIVER": FailedPrecondition,
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH": FailedPrecondition,
    "CUDA_ERROR_INVALID_DEVICE": InvalidArgument,
}


@functools.cache
def driver() -> Any:
    """The `cuda.bindings.driver` module, imported on first use."""
    try:
        from cuda.bindings import driver as cuda_driver
    except ImportError as e:
        raise FailedPrecondition(
            "the CUDA pager backend needs cuda-bindings (`pip install cuda-bindings`)",
            reason="NO_CUDA_BINDINGS",
        ) from e
    return cuda_driver


def _fd_handle_type() -> Any:
    return driver().CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR


def cuda_error(call: str, result: Any, **values: object) -> TorporError:
    """The typed error for a failed driver call; reason is the CUresult name."""
    name = getattr(result, "name", str(result))
    status, text = driver().cuGetErrorString(result)
    description = text.decode() if status == driver().CUresult.CUDA_SUCCESS and text else "?"
    shown = {k: hex(v) if isinstance(v, int) and v > 1 << 32 else str(v) for k, v in values.items()}
    args = ", ".join(f"{k}={v}" for k, v in shown.items())
    return _BY_RESULT.get(name, Internal)(
        f"{call}({args}) failed: {name} ({description})",
        reason=name,
        metadata={"call": call, "result": name, **shown},
    )


def check(call: str, result: tuple[Any, ...], **values: object) -> Any:
    """The value(s) a cuda.bindings call returned after its CUresult; raise if it failed.

    `values` are the arguments worth reporting (sizes, addresses) in the error.
    """
    status, *rest = result
    if status != driver().CUresult.CUDA_SUCCESS:
        raise cuda_error(call, status, **values)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


class _DeviceBytes:
    """`__cuda_array_interface__` (v3) of a raw device range, so torch can view it zero-copy."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "strides": None,
            "version": 3,
        }


class CudaBackend:
    """`MemoryBackend` over CUDA VMM on one device.

    Construction checks that a driver and the device exist and support VMM, and fails with
    FailedPrecondition naming what is missing.
    """

    kind = "cuda"

    def __init__(self, device_index: int = 0, *, exportable: bool = False) -> None:
        """`exportable`: create allocations that `export` can hand to another process (the
        keeper fills a deep-resumed arena that way); requesting it costs nothing measurable
        (mapping 64 GiB took 9 to 14 ms either way on an H200)."""
        cu = driver()
        try:
            check("cuInit", cu.cuInit(0))
        except TorporError:
            raise
        except Exception as e:  # no libcuda on this host: cuda.bindings raises its own type
            raise FailedPrecondition(
                f"no CUDA driver is usable on this host ({e}); use the CPU pager backend",
                reason="NO_CUDA_DRIVER",
            ) from e
        self.device = torch.device("cuda", device_index)
        dev = check("cuDeviceGet", cu.cuDeviceGet(device_index), device=device_index)
        self._require_vmm(dev, device_index)
        self._context = check(
            "cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(dev), device=device_index
        )
        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = device_index
        self.exportable = exportable
        if exportable:
            self._prop.requestedHandleTypes = _fd_handle_type()
        self._access = cu.CUmemAccessDesc()
        self._access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = device_index
        self._access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._make_current()
        recommended = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        self._granularity = int(
            check(
                "cuMemGetAllocationGranularity",
                cu.cuMemGetAllocationGranularity(self._prop, recommended),
            )
        )

    @staticmethod
    def _require_vmm(dev: Any, device_index: int) -> None:
        cu = driver()
        attribute = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        if not check("cuDeviceGetAttribute", cu.cuDeviceGetAttribute(attribute, dev)):
            raise FailedPrecondition(
                f"CUDA device {device_index} does not support virtual memory management "
                "(cuMemCreate/cuMemMap); arenas need it",
                reason="NO_CUDA_VMM",
                metadata={"device": device_index},
            )

    def _make_current(self) -> None:
        """Make the primary context current on this thread (driver calls need one)."""
        cu = driver()
        current = check("cuCtxGetCurrent", cu.cuCtxGetCurrent())
        if int(current) != int(self._context):
            check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._context))

    def granularity(self) -> int:
        return self._granularity

    def reserve(self, nbytes: int, *, address: int | None = None) -> Reservation:
        cu = driver()
        self._make_current()
        hint = address if address is not None and address % self._granularity == 0 else 0
        if hint:
            # The driver takes the address as a hint: it may answer elsewhere, or fail.
            try:
                got = check(
                    "cuMemAddressReserve",
                    cu.cuMemAddressReserve(nbytes, self._granularity, hint, 0),
                    nbytes=nbytes,
                    address=hint,
                )
                return Reservation(int(got), nbytes, requested=address)
            except TorporError:
                pass  # fall back to any address; Reservation.honored reports it
        got = check(
            "cuMemAddressReserve",
            cu.cuMemAddressReserve(nbytes, self._granularity, 0, 0),
            nbytes=nbytes,
        )
        return Reservation(int(got), nbytes, requested=address)

    def free(self, reservation: Reservation) -> None:
        self._make_current()
        check(
            "cuMemAddressFree",
            driver().cuMemAddressFree(reservation.address, reservation.nbytes),
            address=reservation.address,
            nbytes=reservation.nbytes,
        )

    def create(self, nbytes: int) -> Allocation:
        self._make_current()
        handle = check("cuMemCreate", driver().cuMemCreate(nbytes, self._prop, 0), nbytes=nbytes)
        return Allocation(handle, nbytes)

    def export(self, allocation: Allocation) -> int:
        if not self.exportable:
            raise FailedPrecondition(
                "this backend's allocations cannot be exported (made without exportable=True)",
                reason="NOT_EXPORTABLE",
            )
        self._make_current()
        return int(
            check(
                "cuMemExportToShareableHandle",
                driver().cuMemExportToShareableHandle(allocation.handle, _fd_handle_type(), 0),
                nbytes=allocation.nbytes,
            )
        )

    def adopt(self, fd: int, nbytes: int) -> Allocation:
        self._make_current()
        try:
            handle = check(
                "cuMemImportFromShareableHandle",
                driver().cuMemImportFromShareableHandle(fd, _fd_handle_type()),
                fd=fd,
                nbytes=nbytes,
            )
        finally:
            # The import holds its own reference; an open descriptor would keep the memory
            # alive after the exporter releases it.
            os.close(fd)
        return Allocation(handle, nbytes)

    def release(self, allocation: Allocation) -> None:
        self._make_current()
        check("cuMemRelease", driver().cuMemRelease(allocation.handle), nbytes=allocation.nbytes)

    def map(self, address: int, allocation: Allocation) -> None:
        self._make_current()
        check(
            "cuMemMap",
            driver().cuMemMap(address, allocation.nbytes, 0, allocation.handle, 0),
            address=address,
            nbytes=allocation.nbytes,
        )

    def set_access(self, address: int, nbytes: int) -> None:
        self._make_current()
        check(
            "cuMemSetAccess",
            driver().cuMemSetAccess(address, nbytes, [self._access], 1),
            address=address,
            nbytes=nbytes,
        )

    def unmap(self, address: int, nbytes: int) -> None:
        self._make_current()
        check("cuMemUnmap", driver().cuMemUnmap(address, nbytes), address=address, nbytes=nbytes)

    def synchronize(self) -> None:
        """Wait for all work of the context, on every stream (torch's included)."""
        self._make_current()
        check("cuCtxSynchronize", driver().cuCtxSynchronize())

    def view(self, address: int, nbytes: int) -> torch.Tensor:
        tensor = torch.as_tensor(_DeviceBytes(address, nbytes), device=self.device)
        if tensor.data_ptr() != address:  # torch copied instead of viewing: never hand that out
            raise Internal(
                f"torch made a copy of device memory at {address:#x} instead of a view",
                reason="VIEW_COPIED",
                metadata={"address": hex(address), "got": hex(tensor.data_ptr())},
            )
        return tensor

    # -- host memory pinning (for HostBuffer; not part of MemoryBackend) -----------------------

    def pin_host(self, address: int, nbytes: int) -> None:
        """Page-lock existing host memory so DMA copies run at full speed (slow: ~2 GB/s)."""
        self._make_current()
        cu = driver()
        check(
            "cuMemHostRegister",
            cu.cuMemHostRegister(address, nbytes, cu.CU_MEMHOSTREGISTER_PORTABLE),
            address=address,
            nbytes=nbytes,
        )

    def unpin_host(self, address: int) -> None:
        """Undo `pin_host`."""
        self._make_current()
        check("cuMemHostUnregister", driver().cuMemHostUnregister(address), address=address)
