"""The CUDA path of the engine: graph decode, bf16 and fp8 (skipped where there is no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest
from torpor.worker.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def requests(vocab: int, count: int) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(0)
    return [
        GenerationRequest(
            f"r{i}", tuple(torch.randint(3, vocab, (5 + 7 * i,), generator=g).tolist()), GREEDY
        )
        for i in range(count)
    ]


def run(model_dir: Path, reqs: list[GenerationRequest], **options: object):
    engine = Engine.load(model_dir, EngineOptions(device="cuda", max_seq_len=512, **options))  # type: ignore[arg-type]
    return engine, engine.generate_all(reqs)


@pytest.mark.parametrize("name", ["llama_gqa_llama3", "qwen2_tied"])
def test_graph_decode_matches_eager_float32(hf_checkpoints: dict[str, Path], name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    reqs = requests(300, 6)
    graphed, with_graphs = run(hf_checkpoints[name], reqs, dtype="float32", max_batch=8)
    assert graphed.graphs_enabled
    eager, without = run(
        hf_checkpoints[name], reqs, dtype="float32", max_batch=8, cuda_graphs=False
    )
    assert not eager.graphs_enabled
    assert [r.token_ids for r in with_graphs] == [r.token_ids for r in without]


def test_graph_decode_is_bit_identical_to_eager_bf16(hf_checkpoints: dict[str, Path]) -> None:
    # One request: the graph and the eager step run the same kernels on the same shapes.
    (req,) = requests(300, 1)
    _, (a,) = run(hf_checkpoints["llama_gqa_llama3"], [req], dtype="bfloat16", max_batch=4)
    _, (b,) = run(
        hf_checkpoints["llama_gqa_llama3"], [req], dtype="bfloat16", max_batch=4, cuda_graphs=False
    )
    assert a.token_ids == b.token_ids
    assert a.logprobs == b.logprobs


def test_cuda_float32_matches_cpu(hf_checkpoints: dict[str, Path]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    reqs = requests(300, 3)
    _, gpu = run(hf_checkpoints["mistral"], reqs, dtype="float32")
    cpu = Engine.load(
        hf_checkpoints["mistral"], EngineOptions(device="cpu", max_seq_len=512)
    ).generate_all(reqs)
    assert [r.token_ids for r in gpu] == [r.token_ids for r in cpu]


def test_fp8_weights_track_bf16(demo_dir: Path) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    fp8 = Engine.load(demo_dir, EngineOptions(device="cuda", dtype="fp8", max_seq_len=256))
    bf16 = Engine.load(demo_dir, EngineOptions(device="cuda", dtype="bfloat16", max_seq_len=256))
    assert fp8.memory.weights.nbytes < 0.75 * bf16.memory.weights.nbytes
    prompt = torch.tensor(bf16.encode("The quick brown fox jumps over the lazy dog"), device="cuda")
    a = fp8.model.prefill(prompt, 0, all_logits=True)
    b = bf16.model.prefill(prompt, 0, all_logits=True)
    assert float((a - b).norm() / b.norm()) < 0.1
    (result,) = fp8.generate_all([GenerationRequest("f", tuple(prompt.tolist()), GREEDY)])
    assert len(result.token_ids) == GREEDY.max_tokens
