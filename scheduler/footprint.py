"""What a model's runtime will cost in bytes, estimated from its checkpoint before any load.

Admission must be byte-accurate before the first load, and torpord never imports torch, so
this reads only config.json and the safetensors headers (a length-prefixed JSON document at
the start of each file). The worker measures the real footprint after its load and the
policy replaces this estimate with it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from torpor import quantization as published
from torpor.checkpoint_files import SMALL_FILES, CheckpointDir, as_checkpoint
from torpor.errors import InvalidArgument
from torpor.quantization import Quantization
from torpor.scheduler.core import Footprint

GiB = 1 << 30
MiB = 1 << 20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
# What stays on a GPU beside the arenas: the CUDA context with cuBLAS, and small buffers outside
# the arenas (rotary tables, static inputs, cuBLAS's workspaces). The ledger test on an H100
# (torch 2.11+cu130, 2026-12-07, docs/RELIABILITY.md#ledger) measured a suspended worker (host
# or disk level) at 752-754 MiB and a resident one at 818 MiB beside its arenas; the context
# stays through a disk-level suspend with what was the residue, so `context` covers both.
CUDA_CONTEXT = 784 * MiB
CUDA_RESIDUE = 80 * MiB
_ALIGN = 256
# The worker's staging buffers (worker/pager: PagerOptions.staging_buffers, snapshot.MAX_CHUNK,
# refill.STAGE_BYTES, PagerOptions.stage_threads + 2). scheduler/ never imports the worker, so
# they are repeated here; the worker sizes its rings to the limit torpord sends
# (WorkerLoadRequest.staging_bytes), so a drift makes it stage slower, never hold more.
STAGING_BUFFERS = 4
STAGING_CHUNK = 64 * MiB
DEEP_STAGE_BUFFERS = 14
DEEP_STAGE_BYTES = 16 * MiB
_STAGING_ALIGN = 2 * MiB


# Bounds of config.json values: a checkpoint past them is a mistake or an attack, and the
# estimate of one would be nonsense (or a ZeroDivisionError for num_attention_heads: 0).
_BOUNDS = {
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "num_hidden_layers": 1 << 12,
    "hidden_size": 1 << 20,
    "head_dim": 1 << 16,
    "max_position_embeddings": 1 << 30,
    "vocab_size": 1 << 24,
}
MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header, in bytes
_MAX_ELEMENTS = 1 << 48  # per tensor: far past any real checkpoint
# A pre-quantized checkpoint's scales: the engine keeps them as float32 per row (counted with
# their weight) or not at all (activation scales, see torpor.quantization).
_SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".input_scale_ub")


def _tensor_shapes(ckpt: CheckpointDir) -> dict[str, list[int]]:
    files = ckpt.shard_names()
    if not files:
        raise InvalidArgument(
            f"{ckpt.path}: no *.safetensors files", reason="CHECKPOINT_INCOMPLETE"
        )
    shapes: dict[str, list[int]] = {}
    for name in files:
        shapes.update(_header_shapes(ckpt, name))
    return shapes


def _header_shapes(ckpt: CheckpointDir, name: str) -> dict[str, list[int]]:
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(
            f"{ckpt.path / name} is not a readable safetensors file: {why}",
            reason="CHECKPOINT_UNREADABLE",
            metadata={"file": name},
        )

    with ckpt.open(name) as fd, os.fdopen(os.dup(fd), "rb") as f:
        size = os.fstat(fd).st_size
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER):
            raise bad(f"header length {length} is past the end of the file or over {MAX_HEADER}")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise bad(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    shapes: dict[str, list[int]] = {}
    for key, value in header.items():
        if key == "__metadata__":
            continue
        shape = value.get("shape") if isinstance(value, dict) else None
        if not isinstance(shape, list) or not all(_dim(d) for d in shape):
            raise bad(f"tensor {key!r} has no valid shape (got {shape!r})")
        if math.prod(shape) > _MAX_ELEMENTS:
            raise bad(f"tensor {key!r} has an absurd shape {shape}")
        shapes[key] = shape
    return shapes


def config_shapes(config: dict[str, object]) -> dict[str, list[int]]:
    """The tensors a checkpoint of this config.json holds, by name, as the engine's weight
    plan (worker/engine/weights.py, `weight_plan`) expects them: what a dummy model's
    weights are generated as, so its estimate is that of the same config with real weights."""
    heads = _int(config, "num_attention_heads")
    hidden = _int(config, "hidden_size")
    head_dim = _int(config, "head_dim", 0) or hidden // heads
    kv_heads = _int(config, "num_key_value_heads", 0) or heads
    inter = _int(config, "intermediate_size")
    vocab = _int(config, "vocab_size")
    layers = _int(config, "num_hidden_layers")
    names = config.get("architectures") or []
    qwen2 = isinstance(names, list) and "Qwen2ForCausalLM" in names
    attention_bias = bool(config.get("attention_bias", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden]}
    for n in range(layers):
        att, mlp = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        shapes[f"model.layers.{n}.input_layernorm.weight"] = [hidden]
        shapes[f"model.layers.{n}.post_attention_layernorm.weight"] = [hidden]
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[att + proj + ".weight"] = [rows, hidden]
            if qwen2 or attention_bias:
                shapes[att + proj + ".bias"] = [rows]
        shapes[att + "o_proj.weight"] = [hidden, q]
        if attention_bias and not qwen2:
            shapes[att + "o_proj.bias"] = [hidden]
        for proj, dims in (("gate_proj", [inter, hidden]), ("up_proj", [inter, hidden])):
            shapes[mlp + proj + ".weight"] = dims
        shapes[mlp + "down_proj.weight"] = [hidden, inter]
        if config.get("mlp_bias", False):
            shapes[mlp + "gate_proj.bias"] = [inter]
            shapes[mlp + "up_proj.bias"] = [inter]
            shapes[mlp + "down_proj.bias"] = [hidden]
    shapes["model.norm.weight"] = [hidden]
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = [vocab, hidden]
    return shapes


def _dim(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _config(model_dir: Path | CheckpointDir) -> dict[str, object]:
    ckpt = as_checkpoint(model_dir)
    if not ckpt.exists("config.json"):
        raise InvalidArgument(f"{ckpt.path} has no config.json", reason="NO_CONFIG")
    return ckpt.read_json_object("config.json")


def estimate(
    model_dir: Path | CheckpointDir,
    dtype: str,
    max_batch: int,
    max_seq_len: int,
    cuda: bool,
    graph_pool_bytes: int = 512 * MiB,
    dummy: bool = False,
) -> Footprint:
    """Bytes of a runtime of this checkpoint with these options (dtype: float32, bfloat16,
    float16, fp8; an fp8 runtime keeps its embedding in bf16 and activations in bf16, and of a
    pre-quantized checkpoint only the linears it publishes in fp8 are fp8, the rest bf16).
    `dummy`: the weights are generated, not read, so their shapes come from config.json
    (`config_shapes`), and the directory needs no safetensors."""
    ckpt = as_checkpoint(model_dir)
    config = _config(ckpt)
    quant = quantization(config)
    shapes = config_shapes(config) if dummy else _tensor_shapes(ckpt)
    for name in SMALL_FILES:  # refuse a symlink out of the roots now, not at the first load
        ckpt.resolve(name)
    width = BYTES[dtype]
    weights = tensors = 0
    for name, shape in shapes.items():
        if quant is not None and name.endswith(_SCALE_SUFFIXES):
            continue
        count = math.prod(int(dim) for dim in shape)
        if _fp8_matrix(name, shape, dtype, quant):
            weights += count + 4 * int(shape[0])  # e4m3 data plus a float32 scale per row
        else:
            weights += count * (2 if dtype == "fp8" else width)
        weights += _ALIGN
        tensors += 1
    embed = shapes.get("model.embed_tokens.weight")
    tied = config.get("tie_word_embeddings") and "lm_head.weight" not in shapes
    if dtype == "fp8" and quant is None and tied and embed is not None and len(embed) == 2:
        rows, cols = embed
        weights += rows * cols + 4 * rows  # its own quantized copy of the tied head
    heads = _int(config, "num_attention_heads")
    hidden = _int(config, "hidden_size")
    head_dim = _int(config, "head_dim", 0) or hidden // heads
    if head_dim == 0:
        raise InvalidArgument(
            f"config.json: hidden_size // num_attention_heads is 0 ({hidden} // {heads}); "
            "set head_dim or fix the sizes",
            reason="BAD_CONFIG",
            metadata={"file": "config.json", "field": "head_dim"},
        )
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
        snapshot=snapshot_estimate(ckpt, weights, tensors),
        staging=staging_bytes(weights, cuda),
        write_staging=min(STAGING_CHUNK, _piece(weights)) if cuda else 0,
        exchange_staging=DEEP_STAGE_BUFFERS * min(DEEP_STAGE_BYTES, _piece(weights)) if cuda else 0,
    )


def _fp8_matrix(name: str, shape: list[int], dtype: str, quant: Quantization | None) -> bool:
    """Whether the engine stores this checkpoint tensor as e4m3 with float32 row scales: in
    an fp8 runtime, every matrix but the embedding, or of a pre-quantized checkpoint those
    it publishes in fp8."""
    if dtype != "fp8" or len(shape) != 2 or "embed_tokens" in name:
        return False
    return quant is None or quant.scheme(name.removesuffix(".weight")) is not None


def quantization(config: dict[str, object]) -> Quantization | None:
    """config.json's pre-quantized fp8 format, or None; InvalidArgument (reason
    UNSUPPORTED_QUANTIZATION, naming the method and scheme) for one the engine cannot load."""
    layers = _int(config, "num_hidden_layers")
    return published.from_config(config, layers, bool(config.get("tie_word_embeddings", False)))


def staging_bytes(weights: int, cuda: bool) -> int:
    """Host bytes a runtime's worker may hold in staging buffers, an upper bound: the ring of
    a disk read (a load from a snapshot, a resume from disk) is `STAGING_BUFFERS` chunks, each
    no larger than the weights (rounded up: a small model needs no 64 MiB buffers); on CUDA
    also the deep resume's stager (and a snapshot write's one chunk). The larger of them:
    the worker holds one at a time, and the deep stager only while SUSPENDED_DEEP."""
    piece = _piece(weights)
    disk = STAGING_BUFFERS * min(STAGING_CHUNK, piece)
    deep = DEEP_STAGE_BUFFERS * min(DEEP_STAGE_BYTES, piece) if cuda else 0
    return max(disk, deep)


def _piece(weights: int) -> int:
    """The weights rounded up to the staging alignment: no piece is larger."""
    return -(-max(weights, 1) // _STAGING_ALIGN) * _STAGING_ALIGN


def snapshot_estimate(ckpt: CheckpointDir, weights: int, tensors: int) -> int:
    """An upper bound of the chunk-store bytes of a snapshot: the weights, the small files
    it stores (config, tokenizer) and its manifest (a line per tensor and per 64 MiB piece,
    layouts and the config's summary). torpord reserves this before the worker writes, and
    the worker writes no more."""
    files = 0
    for name in SMALL_FILES:
        path = ckpt.resolve(name)
        if path is not None and path.is_file():
            files += path.stat().st_size
    manifest = 16 * 1024 + 512 * tensors + 128 * (weights // (64 << 20) + 1)
    return weights + files + manifest


_CHECKPOINT_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def checkpoint_dtype(model_dir: Path | CheckpointDir, cuda: bool) -> str:
    """The dtype of a registration that names none: fp8 for a pre-quantized fp8 checkpoint on
    CUDA (as published), else the dtype config.json says the weights are in (`dtype`, or the
    older `torch_dtype`; float32 when it says nothing torpor runs), into which the CPU backend
    dequantizes a pre-quantized checkpoint. InvalidArgument for a quantization torpor does
    not load (`quantization`)."""
    config = _config(model_dir)
    if quantization(config) is not None and cuda:
        return "fp8"
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _CHECKPOINT_DTYPES.get(str(value), "float32")


def max_positions(model_dir: Path | CheckpointDir) -> int:
    """The model's max_position_embeddings (the longest max_seq_len it allows)."""
    return _int(_config(model_dir), "max_position_embeddings", 4096)


def vocab_size(model_dir: Path | CheckpointDir) -> int:
    """The model's vocab_size; 0 when config.json does not say (then the worker checks)."""
    return _int(_config(model_dir), "vocab_size", 0)


def _int(config: dict[str, object], key: str, default: int | None = None) -> int:
    """config.json's `key`: a positive integer within its bound, or `default` when absent
    (or null). A `default` of 0 means "absent, derive it" and lets 0 through."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    bound = _BOUNDS.get(key, 1 << 30)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= bound:
        if value == 0 and default == 0:
            return 0
        raise InvalidArgument(
            f"config.json: {key} must be an integer in 1..{bound}, got {value!r}",
            reason="BAD_CONFIG",
            metadata={"file": "config.json", "field": key},
        )
    return value
