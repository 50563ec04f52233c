"""Top log-probabilities per generated token, and the bytes of each token (issue 14)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest, GenerationResult
from torpor.worker.engine.sampling import RequestSampler, SamplingParams, sample_on_device
from torpor.worker.engine.tokenizer import Tokenizer, byte_level_bytes, sentencepiece_bytes

GREEDY_TOP = SamplingParams(
    max_tokens=16, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=5
)
SAMPLED_TOP = SamplingParams(
    max_tokens=16, temperature=1.5, seed=11, ignore_eos=True, logprobs=True, top_logprobs=3
)


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> Engine:
    return Engine.load(demo_dir, EngineOptions(max_batch=4, max_seq_len=256))


def run(engine: Engine, *params: SamplingParams, prompt: str = "The quick brown fox"):
    ids = tuple(engine.encode(prompt))
    requests = [GenerationRequest(f"r{i}", ids, p) for i, p in enumerate(params)]
    return engine.generate_all(requests)


def check_top(result: GenerationResult, n: int) -> None:
    """The top-n of every token: n of them, most likely first, distinct, a probability mass of
    at most 1, and the chosen token's logprob the very same number when it is among them."""
    assert len(result.top_logprobs) == len(result.token_ids) == len(result.logprobs)
    for token, logprob, top in zip(
        result.token_ids, result.logprobs, result.top_logprobs, strict=True
    ):
        assert len(top) == n
        ids = [t for t, _ in top]
        values = [lp for _, lp in top]
        assert len(set(ids)) == n
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
        assert logprob <= values[0]  # nothing beats the most likely
        if token in ids:
            assert values[ids.index(token)] == logprob  # the same tensor, bit for bit
        else:
            assert logprob <= values[-1]


# -- the sampler ------------------------------------------------------------------------------


def test_sample_on_device_computes_the_top_only_when_a_row_asks() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    plain = [RequestSampler(SamplingParams(temperature=0), torch.device("cpu")) for _ in range(3)]
    sampled = sample_on_device(logits.clone(), plain)
    assert sampled.top_ids is None and sampled.top_logprobs is None

    asks = [
        RequestSampler(SamplingParams(temperature=0), torch.device("cpu")),
        RequestSampler(
            SamplingParams(temperature=0, logprobs=True, top_logprobs=2), torch.device("cpu")
        ),
        RequestSampler(
            SamplingParams(temperature=1.0, seed=1, logprobs=True, top_logprobs=4),
            torch.device("cpu"),
        ),
    ]
    out = sample_on_device(logits.clone(), asks)
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == out.top_logprobs.shape == (3, 4)  # the most any row asked
    reference = torch.log_softmax(logits, -1)
    for row in range(3):
        expected = torch.sort(reference[row], descending=True)
        assert out.top_ids[row].tolist() == expected.indices[:4].tolist()
        assert torch.equal(out.top_logprobs[row], expected.values[:4])
    # The same numbers as the chosen tokens' own logprobs, and as without any top-k.
    assert torch.equal(out.tokens[:2], sampled.tokens[:2])
    assert torch.equal(out.logprobs[:2], sampled.logprobs[:2])
    assert out.top_ids[0, 0] == out.tokens[0] and out.top_logprobs[0, 0] == out.logprobs[0]


def test_the_top_never_exceeds_the_vocabulary() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    params = SamplingParams(temperature=0, logprobs=True, top_logprobs=5)
    out = sample_on_device(logits, [RequestSampler(params, torch.device("cpu"))])
    assert out.top_ids is not None and out.top_ids.tolist() == [[2, 1, 0]]


# -- the engine -------------------------------------------------------------------------------


def test_greedy_top_starts_with_the_chosen_token(engine: Engine) -> None:
    (result,) = run(engine, GREEDY_TOP)
    check_top(result, 5)
    for token, logprob, top in zip(
        result.token_ids, result.logprobs, result.top_logprobs, strict=True
    ):
        assert top[0] == (token, logprob)


def test_sampled_tokens_share_the_top_distribution(engine: Engine) -> None:
    (result,) = run(engine, SAMPLED_TOP)
    check_top(result, 3)
    # The logprobs are the raw distribution's, so the top-n is the same with any sampling.
    (greedy,) = run(engine, GREEDY_TOP)
    assert greedy.top_logprobs[0][:3] == result.top_logprobs[0]


def test_asking_changes_nothing_else_and_others_get_none(engine: Engine) -> None:
    plain = SamplingParams(max_tokens=16, temperature=1.5, seed=11, ignore_eos=True)
    (alone,) = run(engine, plain)
    batched = run(engine, plain, SAMPLED_TOP, GREEDY_TOP)
    # Batching changes the logits in the last bits only; top_logprobs is no input to sampling.
    for result in batched[:2]:
        assert result.token_ids == alone.token_ids
        assert result.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert batched[0].top_logprobs == ()
    check_top(batched[1], 3)
    check_top(batched[2], 5)


# -- token bytes ------------------------------------------------------------------------------


def test_demo_token_bytes_concatenate_to_the_text(engine: Engine) -> None:
    tok = engine.tokenizer
    assert tok is not None
    text = "Hello wörld, 10 € and 日本 tokens"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    pieces = [tok.token_bytes(t) for t in ids[1:]]
    assert b"".join(pieces) == text.encode()
    # A multi-byte character split across tokens: some tokens are not UTF-8 on their own.
    broken = [p for p in pieces if not _is_utf8(p)]
    assert broken, pieces
    assert any(p.startswith(b" ") for p in pieces)  # "Ġ" is a space
    assert tok.bos_token_id is not None
    assert tok.token_bytes(tok.bos_token_id) == b"<|begin_of_text|>"
    assert tok.token_bytes(10**6) == b""


def test_every_demo_token_decodes_to_its_bytes(engine: Engine) -> None:
    tok = engine.tokenizer
    assert tok is not None
    special = {t for t in range(tok.vocab_size) if tok.decode([t]) == ""}
    for t in range(tok.vocab_size):
        data = tok.token_bytes(t)
        assert data
        if t not in special:
            assert tok.decode([t]) == data.decode(errors="replace"), t


def test_byte_level_table() -> None:
    assert byte_level_bytes("Ġthe") == b" the"
    assert byte_level_bytes("Ċ") == b"\n"
    assert byte_level_bytes("Ã¼") == "ü".encode()
    assert byte_level_bytes("â") == b"\xe2"  # the first byte of "€" alone
    assert len({byte_level_bytes(chr(c)) for c in range(0x21, 0x7F)}) == 0x7F - 0x21


def test_sentencepiece_bytes(tmp_path: Path) -> None:
    assert sentencepiece_bytes("<0xE2>") == b"\xe2"
    assert sentencepiece_bytes("▁hello") == b" hello"
    assert sentencepiece_bytes("<0xZZ>") == b"<0xZZ>"
    # A checkpoint with a sentencepiece-style tokenizer.json (byte fallback, "▁" spaces).
    vocab = {"<unk>": 0, "▁hello": 1, "▁wor": 2, "ld": 3, "<0xE2>": 4, "<0x82>": 5, "<0xAC>": 6}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    assert [tok.token_bytes(t) for t in range(1, 7)] == [
        b" hello",
        b" wor",
        b"ld",
        b"\xe2",
        b"\x82",
        b"\xac",
    ]
    assert b"".join(tok.token_bytes(t) for t in (4, 5, 6)).decode() == "€"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
