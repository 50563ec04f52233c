"""The fused Triton kernels compute what their torch references compute.

They are `gpu` tests. With Triton installed but no GPU they can also run in Triton's
interpreter: TRITON_INTERPRET=1 TORPOR_TEST_INTERPRET=1 pytest -m gpu tests/engine/test_kernels.py
"""

from __future__ import annotations

import os

import pytest
import torch

from torpor.worker.engine import kernels as K

pytestmark = pytest.mark.gpu

if K.triton is None:
    pytest.skip("triton is not installed (CPU build of torch)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and TRITON_INTERPRET=1 is not set", allow_module_level=True)

# The interpreter rounds float32 to bf16 by truncation (the GPU rounds to nearest even), so
# bf16 is checked on the GPU only.
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]

# bf16 results may differ from the reference by one unit in the last place (a float32 sum
# in another order); float32 results by rounding only.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = b.float().abs().clamp(min=1.0)
    return bool(((a.float() - b.float()).abs() / scale).max() <= TOL[dtype] * 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 4096, 5120])
def test_add_rms_norm(dtype: torch.dtype, hidden: int) -> None:
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=g).to(DEVICE, dtype)
    d = torch.randn(5, hidden, generator=g).to(DEVICE, dtype)
    w = torch.randn(hidden, generator=g).to(DEVICE, dtype)
    ref_x, ref_h = K.add_rms_norm_ref(x, d, w, 1e-5)
    inplace = x.clone()
    got_x, got_h = K.add_rms_norm_triton(inplace, d, w, 1e-5)
    assert got_x.data_ptr() == inplace.data_ptr()  # the residual stream is updated in place
    assert close(got_x, ref_x, dtype) and close(got_h, ref_h, dtype)
    only_norm = K.add_rms_norm_triton(x.clone(), None, w, 1e-5)[1]
    assert close(only_norm, K.rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rope_to_cache(dtype: torch.dtype, head_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, seq, slots, tokens = 8, 2, 40, 4, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    cos = torch.randn(seq, head_dim, generator=g).to(DEVICE, dtype)
    sin = torch.randn(seq, head_dim, generator=g).to(DEVICE, dtype)
    slot_ids = torch.tensor([3, 0, 1, 0, 2], device=DEVICE)
    positions = torch.tensor([5, 0, 39, 1, 17], device=DEVICE)
    # The cache is a strided view of one layer of the whole KV tensor, as in the model.
    ref = torch.zeros(2, 2, slots, kv_heads, seq, head_dim, dtype=dtype, device=DEVICE)
    got = ref.clone()
    q_ref = K.rope_to_cache_ref(qkv, cos, sin, slot_ids, positions, ref[1, 0], ref[1, 1], heads)
    q_got = K.rope_to_cache_triton(qkv, cos, sin, slot_ids, positions, got[1, 0], got[1, 1], heads)
    assert close(q_got, q_ref, dtype)
    assert close(got, ref, dtype)
    assert torch.equal(got[1, 1], ref[1, 1])  # values are copied exactly
    assert not got[0].any()  # nothing written outside the layer


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    gate_up = torch.randn(3, 2 * 3000, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    assert close(K.silu_mul_triton(gate_up), K.silu_mul_ref(gate_up), dtype)
