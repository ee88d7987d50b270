"""Gemma 2: the Llama-like block of `decoder.py` with Gemma's own norms, scaling and soft-capping.

What differs from Llama, all as transformers' Gemma2ForCausalLM computes it:
- RMSNorm multiplies by `1 + weight`, in float32 before casting back (`GemmaRMSNorm`);
- four norms per block: `input_layernorm`, `post_attention_layernorm` (on the attention output, before the residual
  add), `pre_feedforward_layernorm`, `post_feedforward_layernorm`;
- attention scores are scaled by `query_pre_attn_scalar ** -0.5` and soft-capped, `cap * tanh(s / cap)`, before
  the mask: `scaled_dot_product_attention` cannot do that, so this family computes the scores explicitly;
- sliding-window and global layers alternate (`layer_types`, or transformers' rule: even layers slide);
- the MLP is GeGLU (`gelu_pytorch_tanh`); embeddings are scaled by `sqrt(hidden_size)` (the factor cast to the
  model's dtype first) and the final logits soft-capped, both in `ClientParts` on the client side; the head is tied.

Gemma 3 text (`gemma3.py`) adds per-head q/k norms and a separate rope base for the sliding layers: the same code,
its own `read_config`. Like the other Llama-likes, nothing here imports transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..cache import LayerSlot
from . import base, decoder
from .decoder import MLP, Attention, DecoderConfig, DecoderFamily, Prepared, RMSNorm, RopeConfig

__all__ = [
    "FAMILY",
    "GemmaBlock",
    "GemmaClientParts",
    "GemmaConfig",
    "GemmaFamily",
    "GemmaRMSNorm",
    "as_gemma_config",
    "read_config",
]

# transformers' Gemma2Config defaults for the fields a block reads
DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    """A `DecoderConfig` plus Gemma's attention scale, soft-caps and (Gemma 3) the sliding layers' own rope."""

    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope: RopeConfig | None = None  # rope of the sliding-window layers when it differs (Gemma 3)


def gemma_layer_windows(fields: Mapping[str, Any], pattern: int) -> list[int | None]:
    """Per-layer windows from `layer_types`, or transformers' older rule: layer i slides unless (i + 1) % pattern == 0
    (Gemma 2: pattern 2, even layers slide; Gemma 3: `sliding_window_pattern`, 6)."""
    layers = int(fields["num_hidden_layers"])
    window = fields.get("sliding_window")
    types = fields.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ]
    if window is None:
        if "sliding_attention" in types:
            raise ValueError("config.json marks sliding_attention layers but gives no sliding_window")
        return [None] * len(types)
    size = int(window)
    return [size if kind == "sliding_attention" else None for kind in types]


def read_gemma_config(
    fields: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    pattern: int,
    qk_norm: bool = False,
    rope: RopeConfig | None = None,
    local_rope: RopeConfig | None = None,
    attn_logit_softcapping: bool = True,
) -> GemmaConfig:
    """config.json's fields (with `defaults` for the missing ones) as a `GemmaConfig`; Gemma 2 and 3 share this.

    `rope` replaces the rope read from the top-level fields (Gemma 3 keeps one per layer type); without
    `attn_logit_softcapping` the field is ignored, as transformers' Gemma 3 attention does."""
    merged = {**defaults, **fields}
    if merged.get("use_bidirectional_attention"):
        raise ValueError(
            f"{merged.get('model_type')} with use_bidirectional_attention (an embedding model) is not supported: "
            "petal serves causal language models"
        )
    # Gemma configs name the activation `hidden_activation` (older files also carry a `hidden_act` that
    # transformers ignores)
    merged["hidden_act"] = merged.get("hidden_activation") or "gelu_pytorch_tanh"
    bias = bool(merged.get("attention_bias"))
    plain = DecoderConfig.from_fields(
        merged,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=qk_norm,
        sliding_windows=gemma_layer_windows(merged, pattern),
    )
    shared = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)}
    if rope is not None:
        shared["rope"] = rope
    attn_cap = merged.get("attn_logit_softcapping") if attn_logit_softcapping else None
    final_cap = merged.get("final_logit_softcapping")
    return GemmaConfig(
        **shared,
        query_pre_attn_scalar=float(merged["query_pre_attn_scalar"]),
        attn_logit_softcapping=None if attn_cap is None else float(attn_cap),
        final_logit_softcapping=None if final_cap is None else float(final_cap),
        local_rope=local_rope,
    )


def read_config(fields: Mapping[str, Any]) -> GemmaConfig:
    """Gemma 2: every layer with attention soft-capping; even layers slide unless `layer_types` says otherwise."""
    return read_gemma_config(fields, DEFAULTS, pattern=2)


def as_gemma_config(config: object) -> GemmaConfig:
    """`config` itself, or a transformers Gemma config read by its family's rules."""
    cfg = decoder.as_decoder_config(config)
    if not isinstance(cfg, GemmaConfig):
        raise TypeError(f"expected a Gemma config, got a {cfg.model_type} one")
    return cfg


# ---- modules ---------------------------------------------------------------------------------------------------


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: `x * (1 + weight)` in float32, cast back afterwards (Llama's casts before the multiply).

    A subclass only so that it fits where decoder.py's modules hold an `RMSNorm` (q/k norms, the client's final norm).
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__(size, eps)
        self.weight = nn.Parameter(torch.zeros(size))  # zeros: the identity scale, as transformers initializes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


@dataclass
class GemmaPrepared(Prepared):
    """`Prepared` plus the sliding layers' own rotary cos/sin when their rope differs (Gemma 3); else None."""

    local_cos: torch.Tensor | None = None
    local_sin: torch.Tensor | None = None


class GemmaAttention(Attention):
    """Grouped-query attention with explicit scores: scaled by `query_pre_attn_scalar ** -0.5`, soft-capped, masked,
    softmax in float32 (transformers' eager attention, the only one it allows with soft-capping)."""

    def __init__(self, config: GemmaConfig, window: int | None) -> None:
        super().__init__(config, window)
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.softcap = config.attn_logit_softcapping
        if config.qk_norm:  # Gemma 3: the per-head norms are Gemma norms too
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: int,
        t: int,
        prepared: Prepared,
        kv: LayerSlot | None,
    ) -> torch.Tensor:
        """`Attention._attend` with explicit, soft-capped scores (the projections stay in `Attention.forward`)."""
        q = q.reshape(batch, t, -1, self.head_dim)
        k = k.reshape(batch, t, -1, self.head_dim)
        v = v.reshape(batch, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = prepared.cos, prepared.sin
        if self.window is not None and isinstance(prepared, GemmaPrepared) and prepared.local_cos is not None:
            assert prepared.local_sin is not None
            cos, sin = prepared.local_cos, prepared.local_sin
        q = q * cos + decoder._rotate_half(q) * sin
        k = k * cos + decoder._rotate_half(k) * sin
        if kv is not None:
            k, v = kv.update(k, v)
        mask = prepared.mask(self.window)  # [B, 1, t, L]
        if self.groups > 1 and t == 1:  # decode: the query heads of a group share their kv head, no key copies
            q = q.reshape(batch, self.kv_heads, self.groups, self.head_dim)
        elif self.groups > 1:
            k, v = decoder._repeat_kv(k, self.groups), decoder._repeat_kv(v, self.groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)
        return out.reshape(batch, self.heads, t, self.head_dim).transpose(1, 2).reshape(batch, t, -1)


class GemmaBlock(nn.Module):
    """One Gemma 2/3 layer: x + post_attn_norm(attn(input_norm(x))), then + post_ff_norm(mlp(pre_ff_norm(.)))."""

    def __init__(self, config: GemmaConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = GemmaAttention(config, config.sliding_windows[index])
        self.mlp = MLP(config)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, hidden: torch.Tensor, prepared: Prepared, kv: LayerSlot | None = None) -> torch.Tensor:
        hidden = hidden + self.post_attention_layernorm(self.self_attn(self.input_layernorm(hidden), prepared, kv))
        out: torch.Tensor = hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        return out


# ---- the family interface (petal.kernels.families.base) --------------------------------------------------------


def make_block(config: object, index: int) -> nn.Module:
    return GemmaBlock(as_gemma_config(config), index)


class GemmaClientParts(decoder.ClientParts):
    """Embeddings scaled by sqrt(hidden_size), Gemma's final norm, the tied head and the final logit soft-cap."""

    def __init__(self, config: object) -> None:
        super().__init__(config)
        cfg = as_gemma_config(config)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_scale = cfg.hidden_size**0.5
        self.softcap = cfg.final_logit_softcapping

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = super().embed(input_ids)
        # transformers keeps the factor as a float32 tensor and casts it to the weights' dtype before multiplying
        # (sqrt(3072) = 55.43 becomes 55.5 in bf16); doing the same keeps half-precision clients exact
        scale = torch.tensor(self.embed_scale, dtype=torch.float32).to(embeds.dtype)
        return embeds * scale.to(embeds.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def client_param_names(config: object) -> dict[str, str]:
    with torch.device("meta"):
        parts = GemmaClientParts(config)
    return base.names_by_prefix(parts, decoder.CLIENT_PREFIXES)


class GemmaBlockRunner(decoder.BlockRunner):
    """The decoder's runner, plus a second rotary table for the sliding layers when their rope differs."""

    def __init__(self, config: object) -> None:
        super().__init__(config)
        cfg = as_gemma_config(config)
        self.local_inv_freq = None
        if cfg.local_rope is not None:
            with torch.device("cpu"):
                self.local_inv_freq = cfg.local_rope.inv_freq(cfg.head_dim)

    def prepare(self, attention_mask: torch.Tensor, t: int, dtype: torch.dtype) -> GemmaPrepared:
        plain = super().prepare(attention_mask, t, dtype)
        prepared = GemmaPrepared(cos=plain.cos, sin=plain.sin, key_mask=plain.key_mask, t=t, masks={})
        if self.local_inv_freq is not None:
            positions = base.position_ids(attention_mask)[:, -t:]
            freqs = positions[..., None].float() * self.local_inv_freq.to(attention_mask.device)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]
            prepared.local_cos, prepared.local_sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return prepared


class GemmaFamily(DecoderFamily):
    """`DecoderFamily` with Gemma's block, client parts and runner."""

    ClientParts = GemmaClientParts
    BlockRunner = GemmaBlockRunner

    def __init__(self, read_config: Callable[[Mapping[str, Any]], DecoderConfig]) -> None:
        super().__init__(read_config)

    @staticmethod
    def make_block(config: object, index: int) -> nn.Module:
        return make_block(config, index)

    @staticmethod
    def client_param_names(config: object) -> dict[str, str]:
        return client_param_names(config)


FAMILY = GemmaFamily(read_config)
