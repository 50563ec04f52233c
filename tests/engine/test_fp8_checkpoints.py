"""Pre-quantized FP8 checkpoints (issue 15), loaded as they are published: compressed-tensors
and FBGEMM fp8, on Llama and Qwen2 (tests/engine/conftest.py, `fp8_checkpoints`).

On the CPU the engine dequantizes them (weight * scale: the dequantized reference), which must
compute what transformers computes on the same checkpoint:
- compressed-tensors: transformers reads the checkpoint itself, through the compressed-tensors
  library, told to dequantize it. (By default it would also round activations to fp8 as the
  scheme says, which the engine does its own way, per row at run time: fp8.py.) Both sides
  then run the same float32 weights, so the tolerance is float32's.
- FBGEMM fp8: transformers loads it only on CUDA (fbgemm-gpu kernels), so the reference is
  transformers on a plain float32 checkpoint holding the dequantized fp8 values
  (`checkpoints.dequantized`).

The fp8 runtime copies the published bytes into its fp8 tensors; that and its forward pass run
here too, through `load_runtime` (the CPU's `torch._scaled_mm`; the engine itself refuses fp8
off CUDA). The same on a GPU: test_fp8_checkpoints_gpu.py.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.engine import checkpoints
from tests.engine.test_matches_transformers import engine_greedy, hf_greedy, prompt_for, rel_err
from torpor.quantization import Method
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.fp8 import Fp8Linear
from torpor.worker.engine.model import DenseLinear
from torpor.worker.engine.model_config import ModelConfig
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.runtime import load_runtime

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

STEPS = 16
RTOL = 1e-4  # float32 on both sides
# fp8 rounds activations per row, which moves the demo model's logits by about 0.1: a greedy
# step whose two best reference logits are closer than this may go either way.
MARGIN = 0.5
TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model",
    "Numbers too: one two three",
    "Pages move from the device to the host",
)
E4M3 = torch.float8_e4m3fn
NAMES = [
    "llama_ct_dynamic",
    "llama_ct_static",
    "llama_ct_regex",
    "qwen2_ct_dynamic",
    "llama_fbgemm",
    "qwen2_fbgemm",
]


def _cpu_fp8_matmul() -> bool:
    """Whether this torch runs `torch._scaled_mm` on the CPU (recent ones do)."""
    a = torch.ones(1, 16).to(E4M3)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(1, 1), scale_b=torch.ones(1, 1), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


needs_cpu_fp8 = pytest.mark.skipif(
    not _cpu_fp8_matmul(), reason="this torch has no fp8 matmul (_scaled_mm) on the CPU"
)


def dequantize_in_transformers() -> dict[str, object]:
    """from_pretrained's arguments that make transformers dequantize a compressed-tensors
    checkpoint into plain float32 linears (`dequantize` in transformers 5; before it,
    `run_compressed=False`)."""
    config = transformers.CompressedTensorsConfig
    if "dequantize" in inspect.signature(config.__init__).parameters:
        return {"quantization_config": config(dequantize=True)}
    return {"quantization_config": config(run_compressed=False)}


@pytest.mark.parametrize("name", NAMES)
def test_the_dequantized_reference_matches_transformers(
    fp8_checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    model_dir = fp8_checkpoints[name]
    engine = Engine.load(model_dir, EngineOptions(max_batch=2, max_seq_len=512, dtype="float32"))
    assert engine.cfg.quantization is not None
    assert not [n for n in engine.memory.weight_tensors if n.endswith(".scale")]
    if engine.cfg.quantization.method is Method.COMPRESSED_TENSORS:
        reference, load = model_dir, dequantize_in_transformers()
    else:
        reference, load = checkpoints.dequantized(model_dir, tmp_path / "plain"), {}
    prompt = prompt_for(engine.cfg.vocab_size)
    ref_prefill, ref_decode, ref_tokens = hf_greedy(reference, prompt, STEPS, **load)
    got_prefill, got_decode, got_tokens = engine_greedy(engine, prompt, STEPS)

    assert rel_err(got_prefill, ref_prefill) < RTOL
    for step, (got, ref) in enumerate(zip(got_decode, ref_decode, strict=True)):
        assert rel_err(got, ref) < RTOL, f"decode step {step}"
    assert got_tokens == ref_tokens


def test_the_reference_is_the_fp8_values_not_the_original_weights(
    hf_checkpoints: dict[str, Path], fp8_checkpoints: dict[str, Path]
) -> None:
    """The comparison above could not tell a loader that read the original weights (there
    are none in the checkpoint, but a bug could skip the scale): fp8 rounding moves logits by
    far more than RTOL, and a missing scale by far more again."""
    options = EngineOptions(max_seq_len=512, dtype="float32")
    prompt = torch.tensor(prompt_for(300))
    fp8 = Engine.load(fp8_checkpoints["llama_ct_dynamic"], options).model.prefill(prompt, 0, True)
    plain = Engine.load(hf_checkpoints["llama_gqa_llama3"], options).model.prefill(prompt, 0, True)
    assert 1e-3 < rel_err(fp8, plain) < 0.5


@pytest.mark.parametrize("name", ["llama_ct_static", "qwen2_fbgemm"])
def test_bfloat16_is_the_dequantized_values_in_bfloat16(
    fp8_checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """`--dtype bfloat16` on an fp8 checkpoint is exactly a plain checkpoint of its
    dequantized values loaded in bfloat16: the same weights, bit for bit, so the same logits."""
    options = EngineOptions(max_seq_len=512, dtype="bfloat16")
    fp8 = Engine.load(fp8_checkpoints[name], options)
    plain = Engine.load(checkpoints.dequantized(fp8_checkpoints[name], tmp_path / "p"), options)
    assert fp8.memory.dtype == "bfloat16"
    assert fp8.memory.weight_tensors.keys() == plain.memory.weight_tensors.keys()
    for key, tensor in fp8.memory.weight_tensors.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, plain.memory.weight_tensors[key]), key
    prompt = torch.tensor(prompt_for(300))
    assert torch.equal(fp8.model.prefill(prompt, 0, True), plain.model.prefill(prompt, 0, True))


def _fp8_runtime(model_dir: Path):
    """An fp8 runtime on the CPU, built by the engine's own loader (past the dtype check)."""
    cfg = ModelConfig.from_dir(model_dir)
    options = EngineOptions(max_batch=2, max_seq_len=128).resolved(cfg)
    model, memory, _ = load_runtime(
        model_dir, cfg, options, torch.device("cpu"), "fp8", torch.bfloat16, None, None
    )
    return model, memory.weight_tensors


def _rows(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """A published scale as one float32 per row of its weight."""
    rows = state[module + ".weight"].shape[0]
    return state[module + ".weight_scale"].float().reshape(-1).expand(rows)


@pytest.mark.parametrize("name", ["llama_ct_dynamic", "llama_ct_static", "llama_fbgemm"])
def test_fp8_weights_are_the_published_bytes_and_scales(
    fp8_checkpoints: dict[str, Path], name: str
) -> None:
    model, w = _fp8_runtime(fp8_checkpoints[name])
    state = load_file(str(fp8_checkpoints[name] / "model.safetensors"))
    att = "model.layers.1.self_attn."
    qkv = [att + "q_proj", att + "k_proj", att + "v_proj"]
    published = torch.cat([state[m + ".weight"] for m in qkv])
    assert w["layers.1.wqkv"].dtype == E4M3
    assert torch.equal(w["layers.1.wqkv"].view(torch.uint8), published.view(torch.uint8))
    # Per channel: the scales one after the other; per tensor: each on every row of its part.
    assert torch.equal(w["layers.1.wqkv.scale"], torch.cat([_rows(state, m) for m in qkv]))
    assert isinstance(model.layers[1].wqkv, Fp8Linear)
    # lm_head as published: fp8 where the checkpoint quantizes it, else bfloat16.
    if "lm_head.weight_scale" in state:
        assert torch.equal(w["lm_head.scale"], _rows(state, "lm_head"))
        assert isinstance(model.lm_head, Fp8Linear)
    else:
        assert "lm_head.scale" not in w and w["lm_head"].dtype == torch.bfloat16
        assert torch.equal(w["lm_head"], state["lm_head.weight"].to(torch.bfloat16))
        assert isinstance(model.lm_head, DenseLinear)
    assert w["embed"].dtype == torch.bfloat16


def test_fbgemm_modules_not_converted_stay_bfloat16(fp8_checkpoints: dict[str, Path]) -> None:
    """`modules_to_not_convert` ["model.layers.0.self_attn"]: layer 0's attention is bf16
    (a prefix at a module boundary), layer 0's MLP and every other layer fp8."""
    model, w = _fp8_runtime(fp8_checkpoints["llama_fbgemm"])
    assert w["layers.0.wqkv"].dtype == w["layers.0.wo"].dtype == torch.bfloat16
    assert "layers.0.wqkv.scale" not in w
    assert isinstance(model.layers[0].wqkv, DenseLinear)
    assert w["layers.0.w13"].dtype == w["layers.2.wqkv"].dtype == E4M3


def test_a_tied_head_stays_the_embedding(fp8_checkpoints: dict[str, Path]) -> None:
    model, w = _fp8_runtime(fp8_checkpoints["qwen2_ct_dynamic"])
    assert "lm_head" not in w  # no quantized copy of the embedding, as a plain fp8 load makes
    assert isinstance(model.lm_head, DenseLinear) and model.lm_head.weight is w["embed"]
    assert w["layers.0.bqkv"].dtype == torch.bfloat16 and w["layers.0.wqkv"].dtype == E4M3


@needs_cpu_fp8
@pytest.mark.parametrize("name", ["demo_ct_dynamic", "demo_ct_regex", "demo_fbgemm"])
def test_the_fp8_forward_tracks_the_dequantized_reference(
    fp8_checkpoints: dict[str, Path], name: str
) -> None:
    """The fp8 path's logits (activations rounded to e4m3 per row) against the same weights
    dequantized to bfloat16: within fp8's error, and the same top token where the reference's
    two best logits are clearly apart."""
    model, _ = _fp8_runtime(fp8_checkpoints[name])
    ref = Engine.load(fp8_checkpoints[name], EngineOptions(max_seq_len=128, dtype="bfloat16"))
    prompt = torch.tensor(ref.encode("The quick brown fox jumps over the lazy dog. Graphs"))
    with torch.no_grad():
        got = model.prefill(prompt, 0, all_logits=True)
        want = ref.model.prefill(prompt, 0, all_logits=True)
    assert rel_err(got, want) < 0.06  # about 0.02 measured
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1 * want.std()
    assert int(clear.sum()) >= 8
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def greedy_agreement(fp8: Any, ref: Any, prompt: list[int], steps: int) -> tuple[int, int]:
    """Greedy decoding with `ref` (the dequantized reference's model), and `fp8` fed the same
    tokens (prefill, then `steps` decode steps through its KV cache): at every step whose two
    best reference logits are MARGIN apart, does `fp8` pick the reference's token? Returns
    (steps checked, steps agreeing). Feeding the reference's tokens keeps one near tie from
    parting the two sequences for good."""
    device = ref.embed.device
    checked = agreed = 0
    with torch.no_grad():
        tokens = torch.tensor(prompt, device=device)
        want, got = ref.prefill(tokens, 0), fp8.prefill(tokens, 0)
        for pos in range(len(prompt), len(prompt) + steps):
            top = want.topk(2).values
            token = int(want.argmax())
            if float(top[0] - top[1]) >= MARGIN:
                checked += 1
                agreed += int(got.argmax()) == token
            step = (torch.tensor([token], device=device), torch.tensor([pos], device=device))
            # Attention reads each model's whole cache (kv: [..., max_seq_len, head_dim]).
            want = ref.decode(*step, ref.kv.shape[4])[0]
            got = fp8.decode(*step, fp8.kv.shape[4])[0]
    return checked, agreed


@needs_cpu_fp8
def test_the_fp8_runtime_picks_the_references_greedy_tokens(
    fp8_checkpoints: dict[str, Path],
) -> None:
    """On the CPU, the check test_fp8_checkpoints_gpu.py runs on a GPU."""
    model, _ = _fp8_runtime(fp8_checkpoints["demo_ct_dynamic"])
    ref = Engine.load(
        fp8_checkpoints["demo_ct_dynamic"], EngineOptions(max_seq_len=128, dtype="bfloat16")
    )
    results = [greedy_agreement(model, ref.model, ref.encode(t), STEPS) for t in TEXTS]
    checked, agreed = (sum(r) for r in zip(*results, strict=True))
    assert checked >= 16 and agreed == checked
