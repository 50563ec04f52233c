"""The engine computes what transformers computes, on checkpoints transformers wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.engine import checkpoints
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest
from torpor.worker.engine.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

DECODE_STEPS = 32
RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def prompt_for(vocab: int, length: int = 20, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def hf_greedy(model_dir: Path, prompt: list[int], steps: int, **load: object):
    """Prefill logits [L, V], then `steps` greedy decode logits through the KV cache (`load`:
    more arguments of from_pretrained)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **load
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        prefill, cache = out.logits[0], out.past_key_values
        token = int(prefill[-1].argmax())
        tokens, decode_logits = [token], []
        for _ in range(steps):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            decode_logits.append(out.logits[0, -1])
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
    return prefill, decode_logits, tokens


def engine_greedy(engine: Engine, prompt: list[int], steps: int):
    model, span = engine.model, engine.options.max_seq_len
    with torch.no_grad():
        prefill = model.prefill(torch.tensor(prompt), slot=0, all_logits=True)
        token = int(prefill[-1].argmax())
        tokens, decode_logits, pos = [token], [], len(prompt)
        for _ in range(steps):
            logits = model.decode(torch.tensor([token]), torch.tensor([pos]), span)[0]
            decode_logits.append(logits)
            token, pos = int(logits.argmax()), pos + 1
            tokens.append(token)
    return prefill, decode_logits, tokens


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "mistral", "qwen2_tied", "llama_sharded"])
def test_logits_and_greedy_tokens_match(hf_checkpoints: dict[str, Path], name: str) -> None:
    model_dir = hf_checkpoints[name]
    engine = Engine.load(model_dir, EngineOptions(max_batch=2, max_seq_len=512, dtype="float32"))
    prompt = prompt_for(engine.cfg.vocab_size)
    ref_prefill, ref_decode, ref_tokens = hf_greedy(model_dir, prompt, DECODE_STEPS)
    got_prefill, got_decode, got_tokens = engine_greedy(engine, prompt, DECODE_STEPS)

    assert rel_err(got_prefill, ref_prefill) < RTOL
    for step, (got, ref) in enumerate(zip(got_decode, ref_decode, strict=True)):
        assert rel_err(got, ref) < RTOL, f"decode step {step}"
    assert got_tokens == ref_tokens

    # The same through the whole engine path (slots, sampler, stop handling).
    params = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0, ignore_eos=True)
    (result,) = engine.generate_all([GenerationRequest("r", tuple(prompt), params)])
    assert list(result.token_ids) == ref_tokens
    ref_logprobs = torch.log_softmax(ref_prefill[-1], -1)[ref_tokens[0]]
    assert result.logprobs[0] == pytest.approx(float(ref_logprobs), abs=1e-4)


def test_sliding_window_is_exercised(hf_checkpoints: dict[str, Path]) -> None:
    # The Mistral checkpoint's window (24) is shorter than prompt + decode (20 + 32), so the
    # match above covers the windowed mask; here we check it changes the result at all.
    engine = Engine.load(hf_checkpoints["mistral"], EngineOptions(max_seq_len=512, dtype="float32"))
    assert set(engine.cfg.layer_windows) == {24}
    prompt = prompt_for(engine.cfg.vocab_size, length=40)
    windowed = engine.model.prefill(torch.tensor(prompt), slot=0, all_logits=True)
    for layer in engine.model.layers:
        object.__setattr__(layer, "window", None)
    full = engine.model.prefill(torch.tensor(prompt), slot=0, all_logits=True)
    assert rel_err(windowed[:24], full[:24]) < 1e-6
    assert rel_err(windowed[30:], full[30:]) > 1e-3


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "qwen2_tied"])
def test_old_config_layout_gives_same_logits(
    hf_checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    old = tmp_path / name
    shutil.copytree(hf_checkpoints[name], old)
    checkpoints.to_old_config_layout(old)
    prompt = prompt_for(300)
    options = EngineOptions(max_seq_len=512, dtype="float32")
    new_logits = Engine.load(hf_checkpoints[name], options).model.prefill(
        torch.tensor(prompt), 0, True
    )
    old_engine = Engine.load(old, options)
    assert old_engine.cfg.checkpoint_dtype == "float32"
    old_logits = old_engine.model.prefill(torch.tensor(prompt), 0, True)
    assert torch.equal(new_logits, old_logits)


def test_demo_checkpoint_is_hugging_face_format(demo_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_dir)
    engine = Engine.load(demo_dir, EngineOptions(max_seq_len=256))
    text = "Hello world, the scheduler wakes the model."
    ids = engine.encode(text)
    assert ids == tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert engine.tokenizer is not None and engine.tokenizer.decode(ids) == text
    ref_prefill, ref_decode, ref_tokens = hf_greedy(demo_dir, ids, 8)
    got_prefill, got_decode, got_tokens = engine_greedy(engine, ids, 8)
    assert rel_err(got_prefill, ref_prefill) < RTOL
    assert all(rel_err(g, r) < RTOL for g, r in zip(got_decode, ref_decode, strict=True))
    assert got_tokens == ref_tokens


def test_demo_logits_are_not_flat(demo_dir: Path) -> None:
    engine = Engine.load(demo_dir, EngineOptions(max_seq_len=256))
    logits = engine.model.prefill(torch.tensor(engine.encode("the quick brown fox")), 0, True)
    probs = torch.softmax(logits[-1], -1)
    assert probs.max() > 10 / engine.cfg.vocab_size  # far from uniform
    assert logits.std() > 1.0
    for name, tensor in engine.memory.weight_tensors.items():
        assert tensor.abs().max() > 0, f"{name} is all zeros"
