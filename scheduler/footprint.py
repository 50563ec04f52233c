"""What a model's runtime will cost in bytes, estimated from its checkpoint before any load.

Admission must be byte-accurate before the first load, and torpord never imports torch, so
this reads only config.json and the safetensors headers (a length-prefixed JSON document at
the start of each file). The worker measures the real footprint after its load and the
policy replaces this estimate with it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from torpor.errors import InvalidArgument
from torpor.scheduler.core import Footprint

GiB = 1 << 30
MiB = 1 << 20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
# What stays on a GPU beside the arenas: the CUDA context with cuBLAS (0.70 GiB measured on an
# H100, DESIGN.md) and small buffers outside the arenas (rotary tables, static inputs).
CUDA_CONTEXT = 700 * MiB
CUDA_RESIDUE = 64 * MiB
_ALIGN = 256


def _tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidArgument(
            f"{model_dir}: no *.safetensors files", reason="CHECKPOINT_INCOMPLETE"
        )
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, struct.error, ValueError) as exc:
            raise InvalidArgument(
                f"{path} is not a readable safetensors file: {exc}", reason="CHECKPOINT_UNREADABLE"
            ) from exc
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _config(model_dir: Path) -> dict[str, object]:
    path = model_dir / "config.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(
            f"{model_dir} has no readable config.json: {exc}", reason="NO_CONFIG"
        ) from exc


def estimate(
    model_dir: Path,
    dtype: str,
    max_batch: int,
    max_seq_len: int,
    cuda: bool,
    graph_pool_bytes: int = 512 * MiB,
) -> Footprint:
    """Bytes of a runtime of this checkpoint with these options (dtype: float32, bfloat16,
    float16, fp8; an fp8 runtime keeps its embedding in bf16 and activations in bf16)."""
    config = _config(model_dir)
    shapes = _tensor_shapes(model_dir)
    width = BYTES[dtype]
    weights = 0
    for name, shape in shapes.items():
        count = 1
        for dim in shape:
            count *= int(dim)
        matrix = len(shape) == 2 and "embed_tokens" not in name
        if dtype == "fp8" and matrix:
            weights += count + 4 * int(shape[0])  # e4m3 data plus a float32 scale per row
        else:
            weights += count * (2 if dtype == "fp8" else width)
        weights += _ALIGN
    if dtype == "fp8" and config.get("tie_word_embeddings") and "lm_head.weight" not in shapes:
        rows, cols = shapes["model.embed_tokens.weight"]
        weights += rows * cols + 4 * rows  # its own quantized copy of the tied head
    heads = _int(config, "num_attention_heads")
    head_dim = _int(config, "head_dim", 0) or _int(config, "hidden_size") // heads
    kv_heads = _int(config, "num_key_value_heads", 0) or heads
    layers = _int(config, "num_hidden_layers")
    kv_width = 2 if dtype == "fp8" else width
    kv = layers * 2 * max_batch * kv_heads * max_seq_len * head_dim * kv_width
    return Footprint(
        weights=weights,
        kv=kv,
        graph_pool=graph_pool_bytes if cuda else 0,
        context=CUDA_CONTEXT if cuda else 0,
        residue=CUDA_RESIDUE if cuda else 0,
    )


_CHECKPOINT_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype config.json says the weights are in (`dtype`, or the older `torch_dtype`);
    float32 when it says nothing torpor runs."""
    config = _config(model_dir)
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _CHECKPOINT_DTYPES.get(str(value), "float32")


def max_positions(model_dir: Path) -> int:
    """The model's max_position_embeddings (the longest max_seq_len it allows)."""
    return _int(_config(model_dir), "max_position_embeddings", 4096)


def vocab_size(model_dir: Path) -> int:
    """The model's vocab_size; 0 when config.json does not say (then the worker checks)."""
    return _int(_config(model_dir), "vocab_size", 0)


def _int(config: dict[str, object], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if value is None and default is not None:
            return default
        raise InvalidArgument(
            f"config.json: {key} must be an integer, got {value!r}", reason="BAD_CONFIG"
        )
    return value
