"""fp8 (e4m3) weights with per-output-channel scales, so a 70B model fits one 80 GB GPU.

Weights are quantized once at load; activations are quantized per row at run time and the
product runs through `torch._scaled_mm` with row-wise scales (Hopper and newer).
"""

from __future__ import annotations

import torch

from torpor.errors import FailedPrecondition

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12


def check_supported(device: torch.device) -> None:
    """Raise FailedPrecondition unless `device` can run fp8 matmuls."""
    if device.type != "cuda":
        raise FailedPrecondition(
            f"fp8 needs a CUDA GPU with compute capability 8.9 or newer; the device is {device}. "
            "Use bfloat16, float16 or float32 here.",
            reason="FP8_UNSUPPORTED",
            metadata={"device": str(device)},
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise FailedPrecondition(
            f"fp8 needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} "
            f"has {major}.{minor}",
            reason="FP8_UNSUPPORTED",
            metadata={"capability": f"{major}.{minor}"},
        )


def quantize_rowwise(weight: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize weight [N, K] into `out` (fp8 [N, K]) and `scale` (float32 [N])."""
    w = weight.float()
    amax = w.abs().amax(dim=1).clamp(min=_MIN_SCALE)  # [N]
    scale.copy_(amax / FP8_MAX)
    out.copy_((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8))


class Fp8Linear:
    """y = x @ dequant(W).T + b with W in e4m3 and one scale per output channel."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        self.qweight = qweight  # [N, K] e4m3
        self.scale_row = scale.view(1, -1)  # [1, N] float32
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=_MIN_SCALE) / FP8_MAX
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(
            xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scale_row, out_dtype=x.dtype
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1)
