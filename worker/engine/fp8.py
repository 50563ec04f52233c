"""fp8 (e4m3) weights with per-output-channel scales, so a 70B model fits one 80 GB GPU.

Weights are quantized once at load, or copied as published from a pre-quantized checkpoint
(`torpor.quantization`: a per-tensor scale becomes the same scale on every row); activations
are quantized per row at run time and the product runs through `torch._scaled_mm` with
row-wise scales (Hopper and newer).

A published activation scheme is not followed: a static `input_scale` (one scale for every
token, calibrated offline) and FBGEMM's `activation_scale_ub` (a clamp on each row's scale)
are checked at load and then unused, because a scale per row computed from that row's own
amax is at least as fine as either and needs no calibration to be right.

In torch, quantizing the activations takes eight or nine small kernels (abs, amax, casts,
clamps, scale, divide) before each matmul, and prefill on a 70B model (80 layers of four
linears) is bound by launching them. So on CUDA one Triton kernel does it all
(`quantize_activations_triton`, one program per row), with the same bits as the torch
reference `quantize_activations_ref`, which is the CPU path.
"""

# No `from __future__ import annotations` here: Triton reads the annotations of @jit
# functions (tl.constexpr) and must see objects, not strings.
import struct

import torch

from torpor.errors import FailedPrecondition
from torpor.worker.engine.kernels import use_triton

try:  # Triton ships with CUDA builds of torch only.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12
# 1/448 rounded to float32. On CUDA, torch computes `t / 448.0` as `t * float32(1/448)` (a
# scalar divisor becomes its reciprocal), so the activation scale is written that way to be
# the same on every device and in the Triton kernel. (It differs from a correctly rounded
# division by 448 in the last bit for about a third of all bf16 values.)
_INV_FP8_MAX = struct.unpack("f", struct.pack("f", 1.0 / FP8_MAX))[0]
# Elements of a row per loop step of the Triton kernel. A decode step's row (M = 1) is one
# program, so longer steps mean fewer dependent trips to memory.
_QUANT_BLOCK = 4096


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


def supported(device: torch.device) -> bool:
    """Whether `device` can run fp8 matmuls (`check_supported` says why not)."""
    try:
        check_supported(device)
    except FailedPrecondition:
        return False
    return True


def quantize_rowwise(weight: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize weight [N, K] into `out` (fp8 [N, K]) and `scale` (float32 [N])."""
    w = weight.float()
    amax = w.abs().amax(dim=1).clamp(min=_MIN_SCALE)  # [N]
    scale.copy_(amax / FP8_MAX)
    out.copy_((w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8))


def dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A published e4m3 weight [N, K] times its scale ([N, 1] per row, or [1, 1]): float32."""
    return qweight.float() * scale


# -- activation quantization -----------------------------------------------------------------


def quantize_activations_ref(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations [M, K] per row: returns (e4m3 [M, K], float32 scales [M, 1]).

    scale = max(amax(|row|), 1e-12) / 448 (as float32 multiplication by 1/448: see
    `_INV_FP8_MAX`); xq = clamp(row / scale, -448, 448) rounded to e4m3 (nearest, ties to even).
    """
    amax = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=_MIN_SCALE)
    x_scale = amax * _INV_FP8_MAX
    xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return xq, x_scale


if triton is not None:

    @triton.jit
    def _max_nan(a, b):
        # A maximum that returns NaN if either side is NaN, as torch's amax and clamp do.
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _e4m3_bits(q):
        # The e4m3fn byte nearest to float32 q (ties to even), for |q| <= 448 or NaN: c10's
        # fp8e4m3fn_from_fp32_value, which torch's `.to(torch.float8_e4m3fn)` uses. Done with
        # integer ops rather than `.to(tl.float8e4nv)` because some Triton versions lower that
        # cast through float16, which rounds twice and can differ from torch on a near-tie.
        bits = q.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        mag = bits & 0x7FFFFFFF
        # Below 2**-6 e4m3 is subnormal, in steps of 2**-9: the float32 addition of 2**14
        # (whose unit in the last place is 2**-9) rounds |q| to a step, ties to even.
        small = (tl.abs(q) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
        # Otherwise drop 20 of the 23 mantissa bits (ties to even) and rebias the exponent.
        normal = (mag - (120 << 23) + 0x7FFFF + ((mag >> 20) & 1)) >> 20
        byte = tl.where(mag < (121 << 23), small, normal)
        byte = tl.where(mag >= (1087 << 20), 0x7F, byte)  # NaN (|q| <= 448 otherwise)
        return (byte | sign).to(tl.uint8)

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        cols,
        x_row_stride,
        min_scale,
        inv_max,
        fp8_max,
        BLOCK: tl.constexpr,
    ):
        # One program per row, two passes over it: the amax, then the quantized values.
        row = tl.program_id(0).to(tl.int64)
        src = x_ptr + row * x_row_stride
        dst = q_ptr + row * cols
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            mask = start + offs < cols
            x = tl.load(src + start + offs, mask=mask, other=0.0).to(tl.float32)
            acc = _max_nan(acc, tl.abs(x))
        amax = tl.reduce(acc, 0, _max_nan)  # exact in any order
        scale = _max_nan(amax, min_scale) * inv_max
        tl.store(s_ptr + row, scale)
        for start in range(0, cols, BLOCK):
            mask = start + offs < cols
            x = tl.load(src + start + offs, mask=mask, other=0.0).to(tl.float32)
            # div_rn: a correctly rounded division, as torch's; `/` is approximate for fp32.
            q = tl.math.div_rn(x, scale)
            q = tl.minimum(_max_nan(q, -fp8_max), fp8_max, propagate_nan=tl.PropagateNan.ALL)
            tl.store(dst + start + offs, _e4m3_bits(q), mask=mask)


def quantize_activations_triton(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_activations_ref` in one kernel launch, bit for bit. x2: [M, K] on CUDA.

    Safe to capture in a CUDA graph: no host syncs, and the only allocations are the outputs.
    """
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, cols = x2.shape
    xq = torch.empty(rows, cols, dtype=FP8, device=x2.device)
    x_scale = torch.empty(rows, 1, dtype=torch.float32, device=x2.device)
    if rows == 0:
        return xq, x_scale
    block = min(_QUANT_BLOCK, triton.next_power_of_2(cols))
    _quantize_rows_kernel[(rows,)](
        x2,
        xq.view(torch.uint8),  # written as bytes: see _e4m3_bits
        x_scale,
        cols,
        x2.stride(0),
        _MIN_SCALE,
        _INV_FP8_MAX,
        FP8_MAX,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return xq, x_scale


class Fp8Linear:
    """y = x @ dequant(W).T + b with W in e4m3 and one scale per output channel.

    `fused` picks the activation quantizer: the Triton kernel or the torch reference (both give
    the same bits). By default it is the switch of the other fused kernels: Triton on CUDA."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        fused: bool | None = None,
    ):
        self.qweight = qweight  # [N, K] e4m3
        self.scale_row = scale.view(1, -1)  # [1, N] float32
        self.bias = bias
        self.fused = use_triton(qweight.device) if fused is None else fused
        self.quantize = quantize_activations_triton if self.fused else quantize_activations_ref

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        xq, x_scale = self.quantize(x2)
        y = torch._scaled_mm(
            xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scale_row, out_dtype=x.dtype
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1)
