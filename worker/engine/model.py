"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) over placed weight tensors.

There is no nn.Module here on purpose: every tensor lives where the engine's placement put
it (an ordinary buffer or a pager arena), and the forward functions only read views. The
KV cache is static — [layers, 2, slots, kv_heads, max_seq_len, head_dim] in one buffer — so
decode can be captured in CUDA graphs and the pager can page the whole cache as one region.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from torpor.worker.engine.fp8 import Fp8Linear
from torpor.worker.engine.kernels import Ops, rms_norm_ref
from torpor.worker.engine.layout import TensorSpec
from torpor.worker.engine.model_config import ModelConfig

Linear = Callable[[torch.Tensor], torch.Tensor]


class Gate(Protocol):
    """Makes the stream wait for the weights of a stage (see `Transformer.gate`)."""

    def __call__(self, stage: int) -> None: ...

    def done(self) -> bool: ...


def kv_spec(cfg: ModelConfig, slots: int, max_seq_len: int, dtype: torch.dtype) -> TensorSpec:
    """The one tensor of the KV cache."""
    shape = (cfg.num_layers, 2, slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
    return TensorSpec("kv", shape, dtype)


class DenseLinear:
    """y = x @ W.T + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def make_linear(w: Mapping[str, torch.Tensor], name: str, bias: str | None) -> Linear:
    b = w.get(bias) if bias else None
    if name + ".scale" in w:
        return Fp8Linear(w[name], w[name + ".scale"], b)
    return DenseLinear(w[name], b)


@dataclass(frozen=True)
class Layer:
    attn_norm: torch.Tensor
    wqkv: Linear
    wo: Linear
    mlp_norm: torch.Tensor
    w13: Linear
    w2: Linear
    window: int | None


class Transformer:
    """Forward passes of one model: `prefill` one request into a slot, `decode` a batch.

    The residual stream is updated in place and each residual add is fused with the RMSNorm
    that follows it (`Ops.add_rms_norm`), the rotary embedding with the KV-cache write.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        kv: torch.Tensor,
        max_seq_len: int,
        dtype: torch.dtype,
        ops: Ops | None = None,
    ) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.kv = kv  # [layers, 2, slots, kv_heads, max_seq_len, head_dim]
        self.embed = weights["embed"]  # [vocab, hidden]
        self.norm = weights["norm"]
        self.lm_head = make_linear(weights, "lm_head" if "lm_head" in weights else "embed", None)
        self.layers = [self._layer(weights, n) for n in range(cfg.num_layers)]
        device = self.embed.device
        self.ops = ops or Ops(device)
        # cos/sin tables [max_seq_len, head_dim], computed in float32 as transformers does
        # and then cast to the compute dtype.
        inv_freq = cfg.rope.inv_freq(cfg.head_dim).to(device)
        freqs = torch.arange(max_seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        # While the weights are still being copied in (a pager's streamed resume): called
        # with a stage before it reads its weights (layer i: stage i; the LM head: stage
        # num_layers), it makes the stream wait for them. None otherwise.
        self.gate: Gate | None = None

    def wait_weights(self, stage: int | None = None) -> None:
        """Order what follows on the stream after the copy of `stage`'s weights (default:
        all of them); a no-op unless a gate is installed, which removes itself when done."""
        gate = self.gate
        if gate is None:
            return
        if gate.done():
            self.gate = None
            return
        gate(self.cfg.num_layers if stage is None else stage)

    def _layer(self, w: Mapping[str, torch.Tensor], n: int) -> Layer:
        p = f"layers.{n}."
        return Layer(
            attn_norm=w[p + "attn_norm"],
            wqkv=make_linear(w, p + "wqkv", p + "bqkv"),
            wo=make_linear(w, p + "wo", p + "bo"),
            mlp_norm=w[p + "mlp_norm"],
            w13=make_linear(w, p + "w13", p + "b13"),
            w2=make_linear(w, p + "w2", p + "b2"),
            window=self.cfg.layer_windows[n],
        )

    def _forward(
        self, x: torch.Tensor, attention: Callable[[int, Layer, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Run every layer over the residual stream x [T, H]; return the final normed [T, H]."""
        eps = self.cfg.rms_norm_eps
        h = self.ops.rms_norm(x, self.layers[0].attn_norm, eps)
        for i, layer in enumerate(self.layers):
            if i and self.gate is not None:
                self.wait_weights(i)
            x, h = self.ops.add_rms_norm(x, attention(i, layer, h), layer.mlp_norm, eps)
            mlp = layer.w2(self.ops.silu_mul(layer.w13(h)))
            after = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            x, h = self.ops.add_rms_norm(x, mlp, after, eps)
        return h

    # -- prefill ---------------------------------------------------------------------------

    def prefill(self, tokens: torch.Tensor, slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt (tokens: [L]) from position 0 and fill `slot` of the KV cache.

        Returns float32 logits: [L, vocab] if `all_logits`, else [vocab] of the last token.
        """
        length = tokens.shape[0]
        positions = torch.arange(length, device=tokens.device)
        slots = torch.full_like(positions, slot)
        masks = _prefill_masks(self.cfg.layer_windows, length, tokens.device)

        def attention(i: int, layer: Layer, h: torch.Tensor) -> torch.Tensor:
            cfg = self.cfg
            cache_k, cache_v = self.kv[i, 0], self.kv[i, 1]  # [slots, KVH, S, D]
            q = self.ops.rope_to_cache(
                layer.wqkv(h), self.cos, self.sin, slots, positions, cache_k, cache_v, cfg.num_heads
            )  # [L, NH, D]
            mask = masks[layer.window]
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],  # [1, NH, L, D]
                cache_k[slot, :, :length][None],  # [1, KVH, L, D]
                cache_v[slot, :, :length][None],
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=True,
            )  # [1, NH, L, D]
            return layer.wo(out[0].transpose(0, 1).reshape(length, cfg.q_size))

        self.wait_weights(0)
        h = self._forward(F.embedding(tokens, self.embed), attention)  # [L, H]
        h = h if all_logits else h[-1:]
        self.wait_weights()
        return self.lm_head(h).float().squeeze(0)

    # -- decode ----------------------------------------------------------------------------

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """One token for each of the first n slots; returns float32 logits [n, vocab].

        tokens, positions: [n]; row i is slot i, writing its KV at positions[i]. Attention
        reads positions [0, span) of each slot, so span must exceed every position. Rows of
        idle slots may carry any token at position 0: their outputs are ignored.
        """
        n = tokens.shape[0]
        slots = torch.arange(n, device=tokens.device)
        keys = torch.arange(span, device=tokens.device)  # [span]
        masks = _decode_masks(self.cfg.layer_windows, keys, positions)
        cfg = self.cfg
        group = cfg.num_heads // cfg.num_kv_heads

        def attention(i: int, layer: Layer, h: torch.Tensor) -> torch.Tensor:
            cache_k, cache_v = self.kv[i, 0], self.kv[i, 1]  # [slots, KVH, S, D]
            q = self.ops.rope_to_cache(
                layer.wqkv(h), self.cos, self.sin, slots, positions, cache_k, cache_v, cfg.num_heads
            )  # [n, NH, D]
            # Grouped-query attention without copying K/V: the query heads that share a KV
            # head become that head's rows of queries. [n, KVH, group, D] vs [n, KVH, span, D].
            out = F.scaled_dot_product_attention(
                q.view(n, cfg.num_kv_heads, group, cfg.head_dim),
                cache_k[:n, :, :span],
                cache_v[:n, :, :span],
                attn_mask=masks[layer.window],
            )
            return layer.wo(out.reshape(n, cfg.q_size))

        self.wait_weights(0)
        h = self._forward(F.embedding(tokens, self.embed), attention)
        self.wait_weights()
        return self.lm_head(h).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


def _prefill_masks(
    windows: tuple[int | None, ...], length: int, device: torch.device
) -> dict[int | None, torch.Tensor | None]:
    """Per distinct window: None (plain causal) or a boolean [L, L] sliding-window mask."""
    masks: dict[int | None, torch.Tensor | None] = {None: None}
    pos = torch.arange(length, device=device)
    for window in set(windows) - {None}:
        assert window is not None
        diff = pos[:, None] - pos[None, :]
        masks[window] = (diff >= 0) & (diff < window)
    return masks


def _decode_masks(
    windows: tuple[int | None, ...], keys: torch.Tensor, positions: torch.Tensor
) -> dict[int | None, torch.Tensor]:
    """Per distinct window: a boolean [n, 1, 1, span] mask of the keys each row may see."""
    diff = positions[:, None] - keys[None, :]  # [n, span]
    masks: dict[int | None, torch.Tensor] = {}
    for window in set(windows):
        visible = diff >= 0 if window is None else (diff >= 0) & (diff < window)
        masks[window] = visible[:, None, None, :]
    return masks
