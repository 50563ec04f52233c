"""Model configuration: what the engine needs from a Hugging Face `config.json`.

Two layouts of config.json exist in the wild and both are read:
- the older one, with `rope_theta` and `rope_scaling` at the top level and `torch_dtype`;
- the newer one that current transformers writes, with `rope_parameters` and `dtype`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torpor import quantization
from torpor.checkpoint_files import CheckpointDir, as_checkpoint
from torpor.errors import InvalidArgument
from torpor.quantization import Quantization

# Architecture name in config.json -> the family whose tensor layout and quirks apply.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Accepted spellings of an engine dtype; "fp8" means e4m3 weights with bf16 activations.
DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "fp8",
}


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16' etc.; InvalidArgument for anything else."""
    canon = DTYPE_ALIASES.get(name.lower())
    if canon is None:
        raise InvalidArgument(
            f"unsupported dtype {name!r}; use float32, bfloat16, float16 or fp8",
            reason="BAD_DTYPE",
            metadata={"dtype": name},
        )
    return canon


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: `kind` is default, linear or llama3 (Llama 3.1 scaling)."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies [head_dim // 2], float32, computed as transformers does."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        inv = 1.0 / (self.theta**exponents)
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "llama3":
            return self._llama3(inv)
        return inv

    def _llama3(self, inv: torch.Tensor) -> torch.Tensor:
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band
        # between is interpolated smoothly (the published reference formula).
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts of a checkpoint, validated."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Per layer: the sliding attention window in tokens, or None for full attention.
    layer_windows: tuple[int | None, ...]
    checkpoint_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # A pre-quantized (fp8) checkpoint's published quantization; None for plain weights.
    quantization: Quantization | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (for snapshot manifests and status)."""
        quant = {} if self.quantization is None else {"quantization": self.quantization.describe()}
        return {
            **quant,
            "architecture": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }

    @classmethod
    def from_dir(cls, model_dir: Path | CheckpointDir) -> ModelConfig:
        ckpt = as_checkpoint(model_dir)
        if not ckpt.exists("config.json"):
            raise InvalidArgument(
                f"{ckpt.path} is not a Hugging Face checkpoint directory: no config.json",
                reason="NO_CONFIG",
                metadata={"path": str(ckpt.path)},
            )
        return cls.from_dict(ckpt.read_json_object("config.json"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Validate `raw` (a parsed config.json); InvalidArgument names what is wrong."""
        if not isinstance(raw, dict):
            raise InvalidArgument(
                f"config.json must hold a JSON object, not {type(raw).__name__}",
                reason="BAD_CONFIG",
            )
        try:
            return cls._from_dict(raw)
        except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
            # A value of the wrong type or a missing key deep in rope or layer settings.
            raise InvalidArgument(
                f"config.json has an invalid value: {type(exc).__name__}: {exc}",
                reason="BAD_CONFIG",
            ) from exc

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(raw)
        family = ARCHITECTURES[architecture]
        num_heads = _int(raw, "num_attention_heads")
        hidden = _int(raw, "hidden_size")
        head_dim = _int(raw, "head_dim") if raw.get("head_dim") else hidden // num_heads
        if head_dim == 0:
            raise InvalidArgument(
                f"config.json: hidden_size // num_attention_heads is 0 ({hidden} // "
                f"{num_heads}); set head_dim or fix the sizes",
                reason="BAD_CONFIG",
                metadata={"key": "head_dim"},
            )
        num_layers = _int(raw, "num_hidden_layers")
        num_kv_heads = _int(raw, "num_key_value_heads") if "num_key_value_heads" in raw else 0
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise InvalidArgument(
                f"num_attention_heads ({num_heads}) is not a multiple of "
                f"num_key_value_heads ({num_kv_heads})",
                reason="BAD_CONFIG",
            )
        attention_bias = bool(raw.get("attention_bias", False))
        tied = bool(raw.get("tie_word_embeddings", False))
        return cls(
            architecture=architecture,
            family=family,
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope(raw),
            max_position_embeddings=_int(
                {"max_position_embeddings": 4096, **raw}, "max_position_embeddings"
            ),
            tie_word_embeddings=tied,
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            layer_windows=_layer_windows(raw, family, num_layers),
            checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_token_ids(raw.get("eos_token_id")),
            quantization=quantization.from_config(raw, num_layers, tied),
        )


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    names = [str(n) for n in names] if isinstance(names, list) else [str(names)]
    for name in names:
        if name in ARCHITECTURES:
            return str(name)
    shown = ", ".join(names) if names else f"model_type={raw.get('model_type')!r}"
    raise InvalidArgument(
        f"unsupported architecture {shown}; torpor's engine runs "
        f"{', '.join(sorted(ARCHITECTURES))}",
        reason="UNSUPPORTED_ARCHITECTURE",
        metadata={"architectures": ",".join(names)},
    )


# Past these a config.json is a mistake or an attack (sizes would overflow or exhaust memory).
_BOUNDS = {
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "num_hidden_layers": 1 << 12,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "head_dim": 1 << 16,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 30,
}


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    bound = _BOUNDS.get(key, 1 << 30)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= bound:
        raise InvalidArgument(
            f"config.json: {key} must be an integer in 1..{bound}, got {value!r}",
            reason="BAD_CONFIG",
            metadata={"key": key},
        )
    return value


def _rope(raw: dict[str, Any]) -> RopeConfig:
    # Newer layout: rope_parameters holds theta and the scaling; older: top-level keys.
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    if not isinstance(params, dict):
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise InvalidArgument(
        f"unsupported rope scaling {kind!r}; supported: default, linear, llama3",
        reason="UNSUPPORTED_ROPE",
        metadata={"rope_type": kind},
    )


def _layer_windows(raw: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if family == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * num_layers
    types = raw.get("layer_types")
    if types is None and family == "qwen2":
        first = int(raw.get("max_window_layers", num_layers))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if types is None:
        types = ["sliding_attention"] * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
