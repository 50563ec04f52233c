"""GPU inventory: simulated CPU devices, NVML through a fake pynvml, detect(), real NVML (gpu)."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest

from torpor.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TorporError,
    Unavailable,
    Unimplemented,
)
from torpor.scheduler.daemon_config import load_config
from torpor.scheduler.inventory import (
    NVML_UNAVAILABLE,
    CpuInventory,
    GpuInfo,
    Inventory,
    NvmlInventory,
    detect,
    from_config,
)

MiB, GiB = 1024**2, 1024**3


# Simulated devices.


def test_cpu_devices_report_what_the_daemon_accounts() -> None:
    inventory: Inventory = CpuInventory(2, 256 * MiB)
    assert inventory.backend == "cpu"
    inventory.set_used(1, 100 * MiB)  # type: ignore[attr-defined]
    assert inventory.gpus() == [
        GpuInfo(0, "cpu", "", 256 * MiB, 0, 256 * MiB),
        GpuInfo(1, "cpu", "", 256 * MiB, 100 * MiB, 156 * MiB),
    ]
    inventory.set_used(1, 0)  # type: ignore[attr-defined]
    assert inventory.used(1) == 0  # type: ignore[attr-defined]
    assert inventory.gpus()[1].free_bytes == 256 * MiB


def test_cpu_device_accounting_is_bounded() -> None:
    inventory = CpuInventory(1, 256 * MiB)
    inventory.set_used(0, 256 * MiB)  # exactly full is fine
    with pytest.raises(ResourceExhausted, match="would not fit") as info:
        inventory.set_used(0, 256 * MiB + 1)
    assert info.value.metadata["gpu"] == "0"
    assert inventory.used(0) == 256 * MiB  # unchanged
    with pytest.raises(ResourceExhausted):
        inventory.set_used(0, -1)
    with pytest.raises(InvalidArgument, match=r"no simulated device 1: there are 1"):
        inventory.set_used(1, 0)
    with pytest.raises(InvalidArgument, match="no simulated device -1"):
        inventory.used(-1)


@pytest.mark.parametrize(("count", "memory"), [(0, MiB), (1, 0)])
def test_cpu_inventory_needs_devices_and_memory(count: int, memory: int) -> None:
    with pytest.raises(InvalidArgument, match="needs count >= 1 and memory_bytes >= 1"):
        CpuInventory(count, memory)


# NVML through a fake pynvml module.


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"fake NVML error {value}")
        self.value = value


@dataclass
class FakeMemory:
    total: int
    used: int
    free: int


@dataclass
class FakeNvml:
    """The part of pynvml that NvmlInventory uses, with failures to order."""

    devices: list[tuple[bytes | str, str, FakeMemory]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # function name -> error code
    calls: list[str] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        codes = {
            "NVML_ERROR_UNINITIALIZED": 1,
            "NVML_ERROR_INVALID_ARGUMENT": 2,
            "NVML_ERROR_NOT_SUPPORTED": 3,
            "NVML_ERROR_NO_PERMISSION": 4,
            "NVML_ERROR_DRIVER_NOT_LOADED": 9,
            "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
            "NVML_ERROR_GPU_IS_LOST": 15,
        }
        for name, code in codes.items():
            setattr(mod, name, code)
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetName",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetMemoryInfo",
        ):
            setattr(mod, name, self._function(name))
        return mod

    def _function(self, name: str):  # type: ignore[no-untyped-def]
        def call(*args: object) -> object:
            self.calls.append(name)
            if name in self.fail:
                raise FakeNVMLError(self.fail[name])
            if name == "nvmlDeviceGetCount":
                return len(self.devices)
            if name == "nvmlDeviceGetHandleByIndex":
                return ("handle", args[0])
            fields = ("nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo")
            if name in fields:
                handle: tuple[str, int] = args[0]  # type: ignore[assignment]  # ("handle", i)
                return self.devices[handle[1]][fields.index(name)]
            return None

        return call


H100 = (b"NVIDIA H100 80GB HBM3", "GPU-aaaa", FakeMemory(80 * GiB, 2 * GiB, 78 * GiB))
H200 = ("NVIDIA H200", "GPU-bbbb", FakeMemory(141 * GiB, 0, 141 * GiB))


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(devices=[H100, H200])
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


def test_nvml_inventory_reports_every_gpu(nvml: FakeNvml) -> None:
    with NvmlInventory() as inventory:
        assert inventory.backend == "cuda"
        assert inventory.gpus() == [
            GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * GiB, 2 * GiB, 78 * GiB),
            GpuInfo(1, "NVIDIA H200", "GPU-bbbb", 141 * GiB, 0, 141 * GiB),
        ]
        nvml.devices[1][2].used = GiB  # memory is read on every call
        assert inventory.gpus()[1].used_bytes == GiB
    assert nvml.calls.count("nvmlInit") == 1 and nvml.calls.count("nvmlShutdown") == 1
    inventory.close()  # idempotent
    assert nvml.calls.count("nvmlShutdown") == 1
    with pytest.raises(FailedPrecondition, match="closed"):
        inventory.gpus()


def test_nvml_inventory_uses_the_configured_gpus(nvml: FakeNvml) -> None:
    with NvmlInventory([1]) as inventory:
        assert [g.uuid for g in inventory.gpus()] == ["GPU-bbbb"]
    with pytest.raises(InvalidArgument, match=r"backend.gpus = \[0, 2\] names GPU 2") as info:
        NvmlInventory([0, 2])
    assert info.value.metadata["field"] == "backend.gpus"
    assert nvml.calls.count("nvmlShutdown") == 2  # the failed one shut NVML down again


@pytest.mark.parametrize(
    ("failing", "code", "error", "reason", "advice"),
    [
        ("nvmlInit", 12, FailedPrecondition, NVML_UNAVAILABLE, "install the NVIDIA driver"),
        ("nvmlInit", 9, FailedPrecondition, NVML_UNAVAILABLE, "kernel driver is not loaded"),
        ("nvmlInit", 4, FailedPrecondition, "NVML_NO_PERMISSION", "/dev/nvidia"),
        ("nvmlDeviceGetCount", 15, Unavailable, "GPU_LOST", "Xid"),
        ("nvmlDeviceGetName", 3, Unimplemented, "NVML_NOT_SUPPORTED", "does not support"),
        ("nvmlDeviceGetUUID", 999, Unavailable, "NVML_ERROR", "nvidia-smi"),
    ],
)
def test_nvml_errors_become_typed_errors(
    nvml: FakeNvml,
    failing: str,
    code: int,
    error: type[TorporError],
    reason: str,
    advice: str,
) -> None:
    nvml.fail[failing] = code
    with pytest.raises(error) as info:
        NvmlInventory()
    assert info.value.reason == reason
    assert f"NVML {failing} failed" in info.value.message and advice in info.value.message
    assert info.value.metadata == {"nvml_call": failing, "nvml_error": str(code)}
    # NVML is shut down again whenever it was initialised.
    assert nvml.calls.count("nvmlShutdown") == (0 if failing == "nvmlInit" else 1)


def test_a_gpu_lost_while_running(nvml: FakeNvml) -> None:
    inventory = NvmlInventory()
    nvml.fail["nvmlDeviceGetMemoryInfo"] = 15
    with pytest.raises(Unavailable, match="fell off the bus") as info:
        inventory.gpus()
    assert info.value.retryable
    nvml.fail["nvmlShutdown"] = 15
    inventory.close()  # logged, not raised


def test_missing_pynvml_is_nvml_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(FailedPrecondition, match="install nvidia-ml-py") as info:
        NvmlInventory()
    assert info.value.reason == NVML_UNAVAILABLE


# detect()


def test_detect_cpu_never_touches_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    inventory = detect("cpu", cpu_devices=3, cpu_device_memory=64 * MiB)
    assert inventory.backend == "cpu"
    assert [g.total_bytes for g in inventory.gpus()] == [64 * MiB] * 3


def test_detect_auto_prefers_nvml_gpus(nvml: FakeNvml) -> None:
    inventory = detect("auto")
    assert isinstance(inventory, NvmlInventory) and len(inventory.gpus()) == 2
    inventory.close()


@pytest.mark.parametrize("code", [12, 9])
def test_detect_auto_falls_back_to_cpu_without_a_driver(nvml: FakeNvml, code: int) -> None:
    nvml.fail["nvmlInit"] = code
    inventory = detect("auto", cpu_devices=2)
    assert inventory.backend == "cpu" and len(inventory.gpus()) == 2


def test_detect_auto_falls_back_to_cpu_without_gpus(nvml: FakeNvml) -> None:
    nvml.devices.clear()
    assert detect("auto").backend == "cpu"
    assert nvml.calls.count("nvmlShutdown") == 1


def test_detect_auto_does_not_hide_a_broken_gpu_host(nvml: FakeNvml) -> None:
    nvml.fail["nvmlInit"] = 4  # a GPU is there, but we may not use it: say so
    with pytest.raises(FailedPrecondition, match=r"backend\.kind = auto, but NVML is not usable"):
        detect("auto")


def test_detect_cuda_without_nvml_or_gpus(nvml: FakeNvml) -> None:
    nvml.fail["nvmlInit"] = 12
    with pytest.raises(FailedPrecondition, match=r"backend\.kind = cuda, but NVML is not usable"):
        detect("cuda")
    del nvml.fail["nvmlInit"]
    nvml.devices.clear()
    with pytest.raises(FailedPrecondition, match="NVML reports no GPU") as info:
        detect("cuda")
    assert info.value.reason == "NO_GPU" and "--backend cpu" in info.value.message


def test_detect_rejects_an_unknown_kind() -> None:
    with pytest.raises(InvalidArgument, match=r"backend\.kind = 'rocm'"):
        detect("rocm")


def test_from_config(nvml: FakeNvml) -> None:
    overrides = {
        "backend.kind": "cpu",
        "backend.cpu_devices": 2,
        "backend.cpu_device_memory": "1GiB",
    }
    inventory = from_config(load_config(None, {}, overrides).backend)
    assert [g.total_bytes for g in inventory.gpus()] == [GiB, GiB]
    gpus = from_config(load_config(None, {}, {"backend.gpus": "1"}).backend)
    assert gpus.backend == "cuda" and [g.index for g in gpus.gpus()] == [1]
    gpus.close()


def test_scheduler_modules_import_neither_pynvml_nor_torch() -> None:
    code = (
        "import sys; import torpor.scheduler.daemon_config, torpor.scheduler.inventory, "
        "torpor.scheduler.metrics; "
        "print(sorted(m for m in ('pynvml', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Real NVML.


@pytest.mark.gpu
def test_real_nvml_inventory() -> None:
    with NvmlInventory() as inventory:
        gpus = inventory.gpus()
    assert gpus, "NVML reports no GPU on a GPU host"
    for gpu in gpus:
        assert gpu.uuid.startswith("GPU-") and gpu.name
        assert gpu.total_bytes > 0 and 0 <= gpu.free_bytes <= gpu.total_bytes
        assert gpu.used_bytes + gpu.free_bytes <= gpu.total_bytes
    auto = detect("auto")
    assert auto.backend == "cuda" and [g.uuid for g in auto.gpus()] == [g.uuid for g in gpus]
    auto.close()
