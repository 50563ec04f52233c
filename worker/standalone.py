"""One-shot generation with no daemon (`torpor run`): load, generate, report timings."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torpor.checkpoint_files import CheckpointDir
from torpor.errors import InvalidArgument
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.model_config import ModelConfig
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest, GenerationResult, RequestDelta
from torpor.worker.engine.sampling import SamplingParams
from torpor.worker.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class RunResult:
    """A finished one-shot generation with its timings in seconds."""

    prompt_ids: tuple[int, ...]
    result: GenerationResult
    load_s: float
    first_token_s: float
    total_s: float

    def as_json(self) -> dict[str, object]:
        r = self.result
        decode_s = max(self.total_s - self.first_token_s, 1e-9)
        return {
            "prompt_ids": list(self.prompt_ids),
            "token_ids": list(r.token_ids),
            "text": r.text,
            "logprobs": list(r.logprobs),
            "finish_reason": r.finish.value,
            "timings": {
                "load_s": round(self.load_s, 4),
                "first_token_s": round(self.first_token_s, 4),
                "total_s": round(self.total_s, 4),
            },
            "decode_tokens_per_s": round(max(len(r.token_ids) - 1, 0) / decode_s, 2),
        }


def _unconfined(model_dir: Path) -> CheckpointDir:
    # `torpor run` reads as the user who runs it, who may read these files anyway: no root
    # but the filesystem's (a Hugging Face cache links its files out of the snapshot dir).
    # Files must still be regular files, so a FIFO cannot hang it.
    return CheckpointDir.confined(model_dir, [Path("/")])


def prompt_tokens(
    model_dir: Path, prompt: str | None, prompt_ids: Sequence[int] | None
) -> list[int]:
    """Token ids exactly as given, or the prompt text tokenized as the checkpoint says."""
    if (prompt is None) == (prompt_ids is None):
        raise InvalidArgument(
            "give either a PROMPT or --prompt-ids, not both or neither", reason="BAD_PROMPT"
        )
    if prompt_ids is not None:
        return list(prompt_ids)
    assert prompt is not None
    return Tokenizer(_unconfined(model_dir)).encode(prompt)


def run_once(
    model_dir: Path,
    prompt_ids: list[int],
    params: SamplingParams,
    options: EngineOptions,
    on_text: Callable[[str], None] | None = None,
) -> RunResult:
    """Load the model, generate for one prompt, stream text to `on_text`."""
    ckpt = _unconfined(model_dir)
    cfg = ModelConfig.from_dir(ckpt)
    params.validate(cfg.vocab_size)  # fail before the (possibly long) load
    if options.max_seq_len <= 0:  # 0: just large enough, within the model's limit
        need = len(prompt_ids) + params.max_tokens
        fitted = min(cfg.max_position_embeddings, max(256, _round_up(need, 256)))
        options = dataclasses.replace(options, max_seq_len=fitted)
    start = time.perf_counter()
    engine = Engine.load(ckpt, options)
    loaded = time.perf_counter()
    deltas: list[RequestDelta] = []
    first = 0.0
    for delta in engine.generate(GenerationRequest("run", tuple(prompt_ids), params)):
        if not deltas:
            first = time.perf_counter() - loaded
        deltas.append(delta)
        if on_text is not None and delta.text:
            on_text(delta.text)
    total = time.perf_counter() - loaded
    return RunResult(
        tuple(prompt_ids), GenerationResult.collect("run", deltas), loaded - start, first, total
    )


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m
