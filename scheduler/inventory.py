"""GPU inventory: the devices torpord may place runtimes on, and their memory.

Two backends behind one protocol, `Inventory`:
- `NvmlInventory`: NVIDIA GPUs through NVML (`pynvml`, from nvidia-ml-py). Total, used and
  free bytes are the driver's, counting every process on the GPU. pynvml is imported when
  an NvmlInventory is made, never at module import, so hosts without it still load this.
- `CpuInventory`: simulated devices of a configured size. Runtimes on them hold real host
  memory through the pager's CPU arenas, but no driver counts it per device, so the daemon
  reports what it has accounted with `set_used`.

`detect(kind)` picks one. NVML calls block (microseconds to milliseconds): from async code,
call `gpus()` through `asyncio.to_thread`.

NVML numbers GPUs in PCI bus order, CUDA by speed unless CUDA_DEVICE_ORDER=PCI_BUS_ID; start
workers with CUDA_VISIBLE_DEVICES set to the GPU's `uuid` so that both agree.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from torpor.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TorporError,
    Unavailable,
    Unimplemented,
)
from torpor.log import get_logger
from torpor.units import format_size

if TYPE_CHECKING:
    from torpor.scheduler.daemon_config import BackendSection

log = get_logger("inventory")

NVML_UNAVAILABLE = "NVML_UNAVAILABLE"
"""Reason of the errors that mean "no NVIDIA driver here", after which auto picks the CPU."""
DEFAULT_CPU_DEVICE_MEMORY = 256 * 1024**2


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One device and its memory at the time of the query (admin.proto's GpuInfo)."""

    index: int
    """NVML index, or 0..count-1 for simulated devices."""
    name: str
    """Product name ("NVIDIA H100 80GB HBM3"), or "cpu" for a simulated device."""
    uuid: str
    """NVML UUID ("GPU-…"); empty for a simulated device."""
    total_bytes: int
    used_bytes: int
    """Bytes in use: by any process (NVML), or as accounted by the daemon (CPU)."""
    free_bytes: int


class Inventory(Protocol):
    """What the daemon needs to know about its devices."""

    @property
    def backend(self) -> str:
        """ "cuda" or "cpu": the worker backend that runtimes on these devices use."""
        ...

    def gpus(self) -> list[GpuInfo]:
        """Every device in use, ordered by index, with its memory now."""
        ...

    def close(self) -> None:
        """Release what the inventory holds; idempotent."""
        ...


class CpuInventory:
    """Simulated devices of `memory_bytes` each; used bytes are those set by the daemon."""

    backend = "cpu"

    def __init__(self, count: int = 1, memory_bytes: int = DEFAULT_CPU_DEVICE_MEMORY) -> None:
        if count < 1 or memory_bytes < 1:
            raise InvalidArgument(
                f"a CPU inventory needs count >= 1 and memory_bytes >= 1, got {count} devices "
                f"of {memory_bytes} bytes",
                metadata={"count": count, "memory_bytes": memory_bytes},
            )
        self._total = memory_bytes
        self._used = [0] * count
        self._lock = threading.Lock()  # set from the event loop, read from threads

    def gpus(self) -> list[GpuInfo]:
        with self._lock:
            used = list(self._used)
        return [GpuInfo(i, "cpu", "", self._total, n, self._total - n) for i, n in enumerate(used)]

    def set_used(self, index: int, nbytes: int) -> None:
        """Record that the runtimes on device `index` now hold `nbytes` of its memory."""
        self._check_index(index)
        if not 0 <= nbytes <= self._total:
            raise ResourceExhausted(
                f"simulated device {index} has {format_size(self._total)}; "
                f"{nbytes} bytes used would not fit (a scheduler accounting bug)",
                reason="DEVICE_FULL",
                metadata={"gpu": index, "used_bytes": nbytes, "total_bytes": self._total},
            )
        with self._lock:
            self._used[index] = nbytes

    def used(self, index: int) -> int:
        """The bytes last set for device `index`."""
        self._check_index(index)
        with self._lock:
            return self._used[index]

    def close(self) -> None:
        """Nothing to release."""

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._used):
            raise InvalidArgument(
                f"no simulated device {index}: there are {len(self._used)} "
                f"(indices 0..{len(self._used) - 1})",
                reason="NO_SUCH_GPU",
                metadata={"gpu": index},
            )


# NVML error constant -> (error class, reason, what the operator can do)
_NVML_ERRORS: dict[str, tuple[type[TorporError], str, str]] = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": (
        FailedPrecondition,
        NVML_UNAVAILABLE,
        "libnvidia-ml.so.1 was not found: install the NVIDIA driver, or run with --backend cpu",
    ),
    "NVML_ERROR_DRIVER_NOT_LOADED": (
        FailedPrecondition,
        NVML_UNAVAILABLE,
        "the NVIDIA kernel driver is not loaded (does `nvidia-smi` work?): load it, or run "
        "with --backend cpu",
    ),
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": (
        FailedPrecondition,
        "NVML_DRIVER_MISMATCH",
        "NVML and the kernel driver differ in version (a driver upgrade without a reboot): "
        "reboot, or reload the nvidia kernel modules",
    ),
    "NVML_ERROR_NO_PERMISSION": (
        FailedPrecondition,
        "NVML_NO_PERMISSION",
        "no permission to query the GPU: run torpord as a user that may open /dev/nvidia* "
        "(in a container, pass the GPU devices in)",
    ),
    "NVML_ERROR_GPU_IS_LOST": (
        Unavailable,
        "GPU_LOST",
        "the GPU fell off the bus: look for Xid errors in `dmesg`; it needs a reset or a reboot",
    ),
    "NVML_ERROR_RESET_REQUIRED": (
        Unavailable,
        "GPU_RESET_REQUIRED",
        "the GPU needs a reset (`nvidia-smi -r`) or a reboot",
    ),
    "NVML_ERROR_INSUFFICIENT_POWER": (
        Unavailable,
        "GPU_INSUFFICIENT_POWER",
        "the GPU reports insufficient power: check its power cables",
    ),
    "NVML_ERROR_TIMEOUT": (Unavailable, "NVML_TIMEOUT", "NVML timed out; retry"),
    "NVML_ERROR_NOT_SUPPORTED": (
        Unimplemented,
        "NVML_NOT_SUPPORTED",
        "this GPU or driver does not support the query",
    ),
    "NVML_ERROR_INVALID_ARGUMENT": (
        InvalidArgument,
        "NVML_INVALID_ARGUMENT",
        "a GPU index or handle was invalid: check backend.gpus against `nvidia-smi -L`",
    ),
    "NVML_ERROR_UNINITIALIZED": (Internal, "NVML_UNINITIALIZED", "NVML was used before init"),
}


def _nvml_error(nvml: ModuleType, call: str, exc: Exception) -> TorporError:
    """The TorporError for an NVMLError raised by `call`."""
    code = getattr(exc, "value", None)
    found = [v for k, v in _NVML_ERRORS.items() if getattr(nvml, k, object()) == code]
    cls, reason, advice = (
        found[0] if found else (Unavailable, "NVML_ERROR", "see `nvidia-smi` and `dmesg`")
    )
    return cls(
        f"NVML {call} failed ({exc}): {advice}",
        reason=reason,
        metadata={"nvml_call": call, "nvml_error": code},
    )


def _import_nvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise FailedPrecondition(
            "the NVML Python bindings are missing (import pynvml failed): install "
            "nvidia-ml-py, or run with --backend cpu",
            reason=NVML_UNAVAILABLE,
        ) from exc


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml: bytes


class NvmlInventory:
    """NVIDIA GPUs through NVML: initialised once here, shut down by `close()`.

    `indices` restricts it to those NVML indices (backend.gpus); empty means every GPU.
    """

    backend = "cuda"

    def __init__(self, indices: Sequence[int] = ()) -> None:
        self._nvml = _import_nvml()
        self._call("nvmlInit")
        self._closed = False
        try:
            count = int(self._call("nvmlDeviceGetCount"))
            wanted = list(indices) if indices else list(range(count))
            missing = [i for i in wanted if not 0 <= i < count]
            if missing:
                there = f"GPUs 0..{count - 1}" if count else "no GPU"
                raise InvalidArgument(
                    f"backend.gpus = {list(indices)} names GPU {missing[0]}, but NVML reports "
                    f"{there} (see `nvidia-smi -L`)",
                    reason="NO_SUCH_GPU",
                    metadata={"field": "backend.gpus", "value": missing[0], "gpu_count": count},
                )
            self._devices = [self._describe(i) for i in wanted]
        except BaseException:
            self.close()
            raise

    def _describe(self, index: int) -> tuple[int, Any, str, str]:
        handle = self._call("nvmlDeviceGetHandleByIndex", index)
        name = _text(self._call("nvmlDeviceGetName", handle))
        return index, handle, name, _text(self._call("nvmlDeviceGetUUID", handle))

    def _call(self, name: str, *args: object) -> Any:
        try:
            return getattr(self._nvml, name)(*args)
        except self._nvml.NVMLError as exc:
            raise _nvml_error(self._nvml, name, exc) from exc

    def gpus(self) -> list[GpuInfo]:
        if self._closed:
            raise FailedPrecondition("the NVML inventory is closed", reason="CLOSED")
        out = []
        for index, handle, name, uuid in self._devices:
            memory = self._call("nvmlDeviceGetMemoryInfo", handle)
            out.append(
                GpuInfo(index, name, uuid, int(memory.total), int(memory.used), int(memory.free))
            )
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call("nvmlShutdown")
        except TorporError as exc:  # nothing left to do about it; the process exits soon
            log.warning("nvml_shutdown_failed", error=str(exc), reason=exc.reason)

    def __enter__(self) -> NvmlInventory:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def detect(
    kind: str = "auto",
    *,
    gpus: Sequence[int] = (),
    cpu_devices: int = 1,
    cpu_device_memory: int = DEFAULT_CPU_DEVICE_MEMORY,
) -> Inventory:
    """The inventory for backend `kind`: "cuda" (NVML, or FailedPrecondition), "cpu", or
    "auto" (NVML when it reports at least one GPU, else CPU)."""
    if kind == "cpu":
        return CpuInventory(cpu_devices, cpu_device_memory)
    if kind not in ("auto", "cuda"):
        raise InvalidArgument(
            f"backend.kind = {kind!r} is invalid: it must be one of auto, cuda, cpu",
            reason="INVALID_CONFIG",
            metadata={"field": "backend.kind", "value": kind},
        )
    try:
        nvml = NvmlInventory(gpus)
    except FailedPrecondition as exc:
        if kind == "cuda" or exc.reason != NVML_UNAVAILABLE:
            raise FailedPrecondition(
                f"backend.kind = {kind}, but NVML is not usable: {exc.message}",
                reason=exc.reason,
                metadata=exc.metadata,
            ) from exc
        log.info("inventory_cpu_fallback", reason=exc.reason, detail=exc.message)
        return CpuInventory(cpu_devices, cpu_device_memory)
    if nvml.gpus():
        return nvml
    nvml.close()
    if kind == "cuda":
        raise FailedPrecondition(
            "backend.kind = cuda, but NVML reports no GPU (see `nvidia-smi -L`); run with "
            "--backend cpu on a host without NVIDIA GPUs",
            reason="NO_GPU",
        )
    log.info("inventory_cpu_fallback", reason="NO_GPU", detail="NVML reports no GPU")
    return CpuInventory(cpu_devices, cpu_device_memory)


def from_config(backend: BackendSection) -> Inventory:
    """detect() with the [backend] section's values."""
    return detect(
        backend.kind,
        gpus=backend.gpus,
        cpu_devices=backend.cpu_devices,
        cpu_device_memory=backend.cpu_device_memory,
    )
