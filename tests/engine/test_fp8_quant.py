"""Per-row fp8 quantization of activations: the torch reference, and the fused Triton kernel
that must return the same bits.

The reference is checked on the CPU. The kernel tests are `gpu` tests; with Triton installed
but no GPU they can also run in Triton's interpreter (the kernel does its rounding in integer
and float32 ops, which the interpreter computes exactly as the GPU does):
TRITON_INTERPRET=1 TORPOR_TEST_INTERPRET=1 pytest -m gpu tests/engine/test_fp8_quant.py
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from torpor.worker.engine import fp8
from torpor.worker.engine.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    quantize_activations_ref,
    quantize_activations_triton,
    quantize_rowwise,
)

F = TypeVar("F", bound=Callable[..., object])

if torch.cuda.is_available():
    KERNEL_DEVICE: str | None = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    KERNEL_DEVICE = "cpu"
else:
    KERNEL_DEVICE = None

NO_TRITON = fp8.triton is None
CUDA = torch.cuda.is_available()
FP8_GPU = CUDA and torch.cuda.get_device_capability() >= (8, 9)


def marks(*skips: pytest.MarkDecorator) -> Callable[[F], F]:
    def apply(test: F) -> F:
        for mark in (pytest.mark.gpu, *skips):
            test = mark(test)
        return test

    return apply


skip_no_triton = pytest.mark.skipif(
    NO_TRITON, reason="triton is not installed (CPU build of torch)"
)
# The kernel runs on a GPU, or on the CPU in Triton's interpreter.
kernel_test = marks(
    skip_no_triton,
    pytest.mark.skipif(KERNEL_DEVICE is None, reason="no GPU, and TRITON_INTERPRET=1 is not set"),
)
cuda_test = marks(skip_no_triton, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))
fp8_gpu_test = marks(
    skip_no_triton,
    pytest.mark.skipif(not FP8_GPU, reason="fp8 matmuls need compute capability 8.9 or newer"),
)

# Row magnitudes 2**lo .. 2**hi: for bf16 and float32 some rows fall below the 1e-12 floor of
# the scale; for fp16 they reach its subnormals and stay below its overflow.
EXPONENTS = {torch.bfloat16: (-40, 40), torch.float16: (-12, 8), torch.float32: (-60, 60)}

# Values that e4m3 (3 mantissa bits, subnormal steps of 2**-9) must round, with what it
# rounds them to: exact ties go to the even neighbour, near-ties to the nearer one. With a row
# amax of 448 the scale is exactly 1, so they reach the fp8 rounding unchanged.
ROUNDINGS = {
    1.0625: 1.0,
    1.1875: 1.25,
    1.3125: 1.25,
    1.4375: 1.5,
    3.125: 3.0,
    3.375: 3.5,
    3.875: 4.0,
    2.5 * 2**-9: 2 * 2**-9,
    1.5 * 2**-9: 2 * 2**-9,
    0.5 * 2**-9: 0.0,
    # Only in float32 input (bf16 and fp16 round them to the ties above). Rounding through
    # float16 first would send these to the tie, and then to the even neighbour.
    1.0625 + 2**-20: 1.125,
    3.375 - 2**-19: 3.25,
}
TIES = list(ROUNDINGS)


def activations(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows of very different magnitudes. With three rows or more, row 0 is all zero,
    row 1 holds ROUNDINGS and -448 (so its scale is 1), and row 2 has one outlier that sends
    the rest of it to e4m3 subnormals."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = EXPONENTS[dtype]
    exps = torch.randint(lo, hi + 1, (rows, 1), generator=g).float()
    x = torch.randn(rows, cols, generator=g) * torch.exp2(exps)
    if rows >= 3:
        x[0] = 0.0
        ties = torch.tensor(TIES)
        x[1] = ties.repeat(cols // len(TIES) + 1)[:cols] * torch.sign(
            torch.randn(cols, generator=g)
        )
        x[1, cols // 2] = -FP8_MAX
        x[2] = torch.randn(cols, generator=g) * 2.0**-6
        x[2, cols // 3] = 1000.0
    return x.to(dtype)


def bits_equal(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    (qa, sa), (qb, sb) = a, b
    assert qa.dtype == qb.dtype == FP8 and sa.dtype == sb.dtype == torch.float32
    assert qa.shape == qb.shape and sa.shape == sb.shape
    assert torch.equal(sa, sb)
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8))


# -- the torch reference (CPU) ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_dequantizes_within_fp8_precision(dtype: torch.dtype) -> None:
    x = activations(7, 300, dtype)
    xq, scale = quantize_activations_ref(x)
    assert xq.shape == (7, 300) and xq.dtype == FP8
    assert scale.shape == (7, 1) and scale.dtype == torch.float32
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    # The scale is max(amax, 1e-12) / 448, to the last bit.
    expected = (amax.double().clamp(min=1e-12) / FP8_MAX).float()
    assert torch.allclose(scale, expected, rtol=2**-23, atol=0)
    # Each row's largest value maps to ±448.
    big = amax[:, 0] >= 1e-12
    assert big.sum() >= 2 and torch.all(xq.float().abs().amax(dim=1)[big] == FP8_MAX)
    # e4m3 keeps 3 mantissa bits: half a unit in the last place is 2**-4 of a value, and
    # 2**-10 in the subnormal range (steps of 2**-9).
    err = (xq.float() * scale - xf).abs()
    assert torch.all(err <= (xf.abs() * 2**-4 + scale * 2**-10) * (1 + 2**-10))


def test_reference_zero_row() -> None:
    x = activations(3, 64, torch.bfloat16)
    xq, scale = quantize_activations_ref(x)
    assert scale[0, 0] == torch.tensor(1e-12) / FP8_MAX
    assert float(scale[0, 0]) == pytest.approx(1e-12 / 448, rel=1e-6)
    assert not xq[0].view(torch.uint8).any()  # +0.0 everywhere
    assert xq[1:].view(torch.uint8).any()


def test_reference_rounds_to_nearest_even() -> None:
    row = torch.tensor([[-FP8_MAX, *ROUNDINGS]])
    xq, scale = quantize_activations_ref(row)
    assert float(scale) == 1.0
    assert xq.float()[0].tolist() == [-FP8_MAX, *ROUNDINGS.values()]


def test_fp8_linear_quantizes_with_the_reference_on_cpu() -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    qweight, scale = torch.empty(16, 32, dtype=FP8), torch.empty(16)
    quantize_rowwise(weight, qweight, scale)
    layer = Fp8Linear(qweight, scale, None)
    assert not layer.fused and layer.quantize is quantize_activations_ref


# -- the Triton kernel -----------------------------------------------------------------------


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cols", [4096, 8192, 28672, 5000, 96])
@pytest.mark.parametrize("rows", [1, 7, 128])
def test_triton_is_bit_identical_to_reference(rows: int, cols: int, dtype: torch.dtype) -> None:
    x = activations(rows, cols, dtype, seed=rows * cols).to(KERNEL_DEVICE)
    bits_equal(quantize_activations_triton(x), quantize_activations_ref(x))


@kernel_test
def test_triton_rounds_to_nearest_even() -> None:
    row = torch.tensor([[-FP8_MAX, *ROUNDINGS]], device=KERNEL_DEVICE)
    xq, scale = quantize_activations_triton(row)
    assert float(scale) == 1.0
    assert xq.float()[0].tolist() == [-FP8_MAX, *ROUNDINGS.values()]


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_reads_strided_rows(dtype: torch.dtype) -> None:
    wide = activations(9, 6000, dtype).to(KERNEL_DEVICE)
    rows = wide[1:8, 100:5100]  # rows 6000 elements apart
    bits_equal(quantize_activations_triton(rows), quantize_activations_ref(rows))
    columns = wide[:, :300].t()  # not contiguous in the last dim
    bits_equal(quantize_activations_triton(columns), quantize_activations_ref(columns))
    empty = wide[:0]
    bits_equal(quantize_activations_triton(empty), quantize_activations_ref(empty))


@kernel_test
def test_triton_propagates_nan_like_the_reference() -> None:
    x = activations(4, 5000, torch.bfloat16).to(KERNEL_DEVICE)
    x[3, 4321] = float("nan")
    (qt, st), (qr, sr) = quantize_activations_triton(x), quantize_activations_ref(x)
    assert torch.isnan(st[3]).all() and torch.isnan(sr[3]).all()
    assert torch.isnan(qt[3].float()).all() and torch.isnan(qr[3].float()).all()
    bits_equal((qt[:3], st[:3]), (qr[:3], sr[:3]))


@cuda_test
def test_triton_quantization_replays_in_a_cuda_graph() -> None:
    static = activations(4, 8192, torch.bfloat16).to("cuda")
    quantize_activations_triton(static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quantize_activations_triton(static)
    fresh = activations(4, 8192, torch.bfloat16, seed=7).to("cuda")
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    bits_equal(out, quantize_activations_ref(fresh))


# -- Fp8Linear on an fp8 GPU -----------------------------------------------------------------


@fp8_gpu_test
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 37])
def test_fp8_linear_fused_equals_reference(tokens: int, bias: bool) -> None:
    n, k = 512, 4096
    g = torch.Generator().manual_seed(tokens)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to("cuda", torch.bfloat16)
    qweight = torch.empty(n, k, dtype=FP8, device="cuda")
    scale = torch.empty(n, device="cuda")
    quantize_rowwise(weight, qweight, scale)
    b = torch.randn(n, generator=g).to("cuda", torch.bfloat16) if bias else None
    fused = Fp8Linear(qweight, scale, b)
    assert fused.fused and fused.quantize is quantize_activations_triton
    reference = Fp8Linear(qweight, scale, b, fused=False)
    x = activations(tokens, k, torch.bfloat16).to("cuda").view(1, tokens, k)
    y = fused(x)
    assert y.shape == (1, tokens, n) and y.dtype == torch.bfloat16
    assert torch.equal(y, reference(x))
