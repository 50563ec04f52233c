"""Sampling parameters, their validation, and the sampler.

Log-probabilities are those of the model's raw distribution (log-softmax of the logits, before
temperature, top-k or top-p), so they are comparable across sampling settings. The top
alternatives a request asks for (`top_logprobs`) come from the same tensor, so the chosen
token's value is the same number in both.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from torpor.errors import InvalidArgument

MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_SEED = 2**64 - 1
MAX_TOP_LOGPROBS = 5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request."""

    max_tokens: int = 16
    """Tokens to generate at most; >= 1, and the prompt plus these must fit max_seq_len."""
    temperature: float = 1.0
    """0 is greedy; otherwise logits are divided by it. 0 <= temperature <= 100."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p; (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all; 0 <= top_k <= vocab size."""
    seed: int | None = None
    """Seed of this request's random generator (0 .. 2**64-1); None draws a fresh one."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the returned text stops before them. At most 16."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, in addition to the model's end-of-sequence ids."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks, tests)."""
    logprobs: bool = False
    """The caller wants log-probabilities. The engine computes each token's own always (it
    costs nothing extra); this is what `top_logprobs` needs."""
    top_logprobs: int = 0
    """Alternatives to return per generated token, most likely first; 0..5, > 0 needs
    `logprobs`."""

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidArgument naming the first bad field and its value."""
        _check(1 <= self.max_tokens <= 10**7, "max_tokens", self.max_tokens, "must be >= 1")
        _check(
            math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            self.temperature,
            f"must be between 0 and {MAX_TEMPERATURE:g}",
        )
        _check(
            math.isfinite(self.top_p) and 0 < self.top_p <= 1,
            "top_p",
            self.top_p,
            "must be in (0, 1]",
        )
        _check(0 <= self.top_k <= vocab_size, "top_k", self.top_k, f"must be in [0, {vocab_size}]")
        if self.seed is not None:
            _check(0 <= self.seed <= MAX_SEED, "seed", self.seed, "must be in [0, 2**64-1]")
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            "stop",
            len(self.stop),
            f"at most {MAX_STOP_STRINGS} stop strings",
        )
        for s in self.stop:
            _check(
                0 < len(s) <= MAX_STOP_LENGTH, "stop", repr(s), "stop strings must be 1-256 chars"
            )
        for t in self.stop_token_ids:
            _check(0 <= t < vocab_size, "stop_token_ids", t, f"must be in [0, {vocab_size})")
        _check(
            0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            self.top_logprobs,
            f"must be in [0, {MAX_TOP_LOGPROBS}]",
        )
        _check(
            self.top_logprobs == 0 or self.logprobs,
            "top_logprobs",
            self.top_logprobs,
            "needs logprobs",
        )


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise InvalidArgument(
            f"{name}={value} is invalid: {rule}",
            reason="BAD_SAMPLING_PARAMS",
            metadata={"field": name, "value": value},
        )


@dataclass
class RequestSampler:
    """The sampling state of one request: its parameters and its own random generator."""

    params: SamplingParams
    device: torch.device
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """A token id (0-dim long tensor) from float32 logits [vocab]."""
        p = self.params
        scaled = logits / p.temperature
        if 0 < p.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        if p.top_p < 1.0:
            scaled = _top_p(scaled, p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top one always stays).
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass(frozen=True)
class Sampled:
    """One step's picks for n rows, all still on the device (nothing waits for it)."""

    tokens: torch.Tensor
    """Token ids [n], int64."""
    logprobs: torch.Tensor
    """Their log-probabilities [n], float32, under the raw distribution."""
    top_ids: torch.Tensor | None = None
    """The k most likely token ids per row [n, k], int64, most likely first; k is the most any
    row asked for (rows that asked fewer use a prefix). None when no row asked."""
    top_logprobs: torch.Tensor | None = None
    """Their log-probabilities [n, k], float32, from the same tensor as `logprobs`."""


def sample_on_device(logits: torch.Tensor, samplers: list[RequestSampler]) -> Sampled:
    """Pick one token per row of float32 logits [n, vocab], one sampler per row, without
    waiting for the device. Returns token ids [n] (int64) and their log-probabilities [n]
    (float32) under the raw distribution, and the top alternatives when any row asks for
    them (one top-k over the batch, none when no row asks); all still on the device."""
    tokens = logits.argmax(dim=-1)  # greedy for every row; sampled rows are replaced below
    for i, sampler in enumerate(samplers):
        if sampler.params.temperature > 0:
            tokens[i] = sampler.sample(logits[i])
    all_logprobs = torch.log_softmax(logits, dim=-1)
    logprobs = all_logprobs.gather(1, tokens[:, None])[:, 0]
    k = min(max((s.params.top_logprobs for s in samplers), default=0), logits.shape[-1])
    if k == 0:
        return Sampled(tokens, logprobs)
    top = torch.topk(all_logprobs, k, dim=-1, largest=True, sorted=True)
    return Sampled(tokens, logprobs, top.indices, top.values)
