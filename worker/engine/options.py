"""Engine options: typed, bounded, validated once, with errors that name the bad value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.worker.engine import fp8
from torpor.worker.engine.model_config import DTYPES, ModelConfig, canonical_dtype

MAX_BATCH_LIMIT = 1024
MAX_SEQ_LEN_LIMIT = 1 << 20
DEFAULT_SEQ_LEN = 4096


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model. Every field is checked by `validate()`."""

    max_batch: int = 8
    """KV-cache slots, i.e. requests decoded together; 1 .. 1024."""
    max_seq_len: int = 0
    """Prompt plus generated tokens per request; 16 .. 2**20, and at most the model's
    max_position_embeddings. 0 picks min(max_position_embeddings, 4096)."""
    dtype: str = "auto"
    """float32, bfloat16, float16, fp8, or auto: the checkpoint's dtype on CUDA (fp8 for a
    pre-quantized fp8 checkpoint, on a GPU that runs fp8), float32 on CPU. A pre-quantized
    checkpoint in any dtype but fp8 is dequantized (weight * scale) into that dtype."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    cuda_graphs: bool = True
    """Capture batched decode in CUDA graphs (CUDA only; CPU always runs eager)."""
    graph_batch_sizes: tuple[int, ...] = ()
    """Batch sizes to capture; empty means powers of two up to max_batch, and max_batch."""
    min_span: int = 256
    """Smallest attention span bucket: decode attends over a power-of-two bucket of positions
    (at least this many, at most max_seq_len) rather than the whole max_seq_len; >= 16."""

    def validate(self) -> None:
        _bound("max_batch", self.max_batch, 1, MAX_BATCH_LIMIT)
        if self.max_seq_len != 0:
            _bound("max_seq_len", self.max_seq_len, 16, MAX_SEQ_LEN_LIMIT)
        _bound("min_span", self.min_span, 16, MAX_SEQ_LEN_LIMIT)
        for size in self.graph_batch_sizes:
            _bound("graph_batch_sizes", size, 1, self.max_batch)
        canonical_dtype(self.dtype) if self.dtype != "auto" else None

    def resolved(self, cfg: ModelConfig) -> EngineOptions:
        """These options with `max_seq_len` chosen for the model when it is 0 (auto)."""
        if self.max_seq_len:
            return self
        return dataclasses.replace(
            self, max_seq_len=min(cfg.max_position_embeddings, DEFAULT_SEQ_LEN)
        )

    def batch_sizes(self) -> tuple[int, ...]:
        """Decode batch sizes that have a graph, ascending; the largest is max_batch."""
        sizes = set(self.graph_batch_sizes) or {
            1 << i for i in range(11) if 1 << i < self.max_batch
        }
        return tuple(sorted(sizes | {self.max_batch}))

    def spans(self) -> tuple[int, ...]:
        """Attention span buckets, ascending; the largest is max_seq_len."""
        spans = {self.max_seq_len}
        span = self.min_span
        while span < self.max_seq_len:
            spans.add(span)
            span *= 2
        return tuple(sorted(spans))


def bucket(values: tuple[int, ...], needed: int) -> int:
    """The smallest value >= needed (values ascending)."""
    for value in values:
        if value >= needed:
            return value
    raise ValueError(f"{needed} exceeds the largest bucket {values[-1]}")


def _bound(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(
            f"{name}={value!r} is out of range [{low}, {high}]",
            reason="BAD_ENGINE_OPTION",
            metadata={"field": name, "value": value},
        )


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; FailedPrecondition for cuda without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgument(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(
            "device cuda was asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})",
            reason="NO_GPU",
        )
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> tuple[str, torch.dtype]:
    """The engine dtype's name and the dtype activations are computed in."""
    if name == "auto":
        name = _auto_dtype(cfg, device)
    name = canonical_dtype(name)
    if name == "fp8":
        fp8.check_supported(device)
        return name, torch.bfloat16
    return name, DTYPES[name]


def _auto_dtype(cfg: ModelConfig, device: torch.device) -> str:
    if device.type == "cpu":
        return "float32"
    if cfg.quantization is not None and fp8.supported(device):
        return "fp8"  # as published
    checkpoint = canonical_dtype(cfg.checkpoint_dtype or "float32")
    return "float32" if checkpoint == "fp8" else checkpoint
