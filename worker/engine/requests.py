"""The dataclasses that cross the engine's boundary: requests in, per-request deltas out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from torpor.worker.engine.sampling import SamplingParams

Alternatives = tuple[tuple[int, float], ...]
"""The most likely tokens at one position, most likely first: (token id, log-probability)."""


class FinishReason(enum.Enum):
    """Why a request ended."""

    STOP = "stop"  # an end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the caller or by an eviction


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: token ids of the prompt (already tokenized) and how to sample."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class RequestDelta:
    """What one engine step produced for one request: at most one token and the text that
    became final; `finish` is set on the request's last delta."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    text: str = ""
    finish: FinishReason | None = None
    top_logprobs: tuple[Alternatives, ...] = ()
    """One entry per token when the request asked for top_logprobs, else empty."""


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation, collected from its deltas."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish: FinishReason
    top_logprobs: tuple[Alternatives, ...] = ()

    @classmethod
    def collect(cls, request_id: str, deltas: list[RequestDelta]) -> GenerationResult:
        finish = deltas[-1].finish if deltas else None
        if finish is None:
            raise ValueError(f"request {request_id} has not finished")
        return cls(
            request_id,
            tuple(t for d in deltas for t in d.token_ids),
            tuple(lp for d in deltas for lp in d.logprobs),
            "".join(d.text for d in deltas),
            finish,
            tuple(top for d in deltas for top in d.top_logprobs),
        )
