"""Falcon (rotary): fused `query_key_value`, multi-query / grouped kv heads, LayerNorm, GELU MLP, in plain torch.

Both released layouts, with the checkpoint's names (`transformer.h.{i}.self_attention.query_key_value`, ...):
- Falcon-7B (`new_decoder_architecture: false`): one `input_layernorm` feeding attention and MLP in parallel
  (`parallel_attn`), multi-query attention (`multi_query`: one kv head; without it, q/k/v interleaved per head), and
  the sequential variant (`parallel_attn: false`: `post_attention_layernorm` before the MLP);
- Falcon-40B/180B and Falcon2-11B (`new_decoder_architecture: true`): `num_kv_heads` grouped kv heads, the fused
  projection laid out per kv group as [its queries, key, value], and `ln_attn`/`ln_mlp` (or one `input_layernorm` with
  `num_ln_in_parallel_attn: 1`).
Biases follow `bias`. The KV cache stores only the kv heads (transformers' cache repeats them to every head in the
new layout); the attention itself is decoder.py's math (rotary, grouped-query `scaled_dot_product_attention`,
masks in `Prepared`), so `decoder.BlockRunner` drives these blocks too.

Not supported: ALiBi Falcon (`alibi: true`, the falcon-rw models), refused when the model is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..cache import LayerSlot
from . import base
from .decoder import (
    SUPPORTED_ACTIVATIONS,
    DecoderConfig,
    DecoderFamily,
    Prepared,
    RopeConfig,
    _repeat_kv,
    _rotate_half,
)

__all__ = ["CLIENT_PREFIXES", "FAMILY", "FalconBlock", "FalconConfig", "read_config"]

CLIENT_PREFIXES: dict[str, str] = {
    "word_embeddings.": "transformer.word_embeddings.",
    "ln_f.": "transformer.ln_f.",
    "lm_head.": "lm_head.",
}

# transformers' FalconConfig defaults (Falcon-7B's shape) for the fields a block reads
DEFAULTS: dict[str, Any] = {
    "layer_norm_epsilon": 1e-5,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "alibi": False,
    "new_decoder_architecture": False,
    "multi_query": True,
    "parallel_attn": True,
    "bias": False,
    "activation": "gelu",
}

# old (RW) config.json names -> today's
_ALIASES = {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_embed": "hidden_size"}


@dataclass(frozen=True)
class FalconConfig(DecoderConfig):
    """`DecoderConfig` plus Falcon's block layout. `qkv_layout`: "grouped" (new architecture: per kv group, its
    queries then key and value), "multi_query" (all queries, then the one key and value) or "interleaved" (q, k, v per
    head). `norms`: the block's LayerNorms ("ln_attn+ln_mlp", "input" or "input+post_attention")."""

    qkv_layout: str = "multi_query"
    norms: str = "input"
    parallel_attn: bool = True
    new_decoder_architecture: bool = False
    layer_norm_epsilon: float = 1e-5


def read_config(fields: Mapping[str, Any]) -> FalconConfig:
    """config.json as transformers' FalconConfig reads it (defaults, kv heads per layout, `ffn_hidden_size` = 4 x
    hidden unless given). `fields` stays as given; the typed values are derived beside it."""
    merged = {**DEFAULTS, **{_ALIASES.get(k, k): v for k, v in fields.items()}}
    if merged["alibi"]:
        raise ValueError(
            "Falcon with ALiBi positions (alibi: true, the falcon-rw models) is not supported by petal; "
            "pick a rotary Falcon (falcon-7b, -40b, -180b, Falcon2-11B) or add ALiBi to kernels/families/falcon.py"
        )
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if merged.get(name) is None:
            raise ValueError(f"config.json lacks {name!r}, which a falcon block needs")
    hidden, heads = int(merged["hidden_size"]), int(merged["num_attention_heads"])
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    new_arch, parallel = bool(merged["new_decoder_architecture"]), bool(merged["parallel_attn"])
    if new_arch:
        kv_heads, layout = int(merged.get("num_kv_heads") or heads), "grouped"
        if not parallel:
            raise ValueError("a Falcon with new_decoder_architecture and parallel_attn: false is not a known layout")
        num_ln = merged.get("num_ln_in_parallel_attn") or 2
        norms = "ln_attn+ln_mlp" if int(num_ln) == 2 else "input"
    else:
        multi_query = bool(merged["multi_query"])
        kv_heads, layout = (1, "multi_query") if multi_query else (heads, "interleaved")
        norms = "input" if parallel else "input+post_attention"
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    activation = str(merged["activation"])
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} is not supported: petal supports {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    pad, bias, eps = merged.get("pad_token_id"), bool(merged["bias"]), float(merged["layer_norm_epsilon"])
    return FalconConfig(
        model_type="falcon",
        hidden_size=hidden,
        intermediate_size=int(merged.get("ffn_hidden_size") or 4 * hidden),
        num_hidden_layers=int(merged["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=int(merged["vocab_size"]),
        rms_norm_eps=eps,
        hidden_act=activation,
        rope=RopeConfig.from_fields(merged),
        max_position_embeddings=int(merged["max_position_embeddings"]),
        tie_word_embeddings=bool(merged["tie_word_embeddings"]),
        pad_token_id=None if pad is None else int(pad),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        sliding_windows=(None,) * int(merged["num_hidden_layers"]),
        fields=dict(fields),
        qkv_layout=layout,
        norms=norms,
        parallel_attn=parallel,
        new_decoder_architecture=new_arch,
        layer_norm_epsilon=eps,
    )


def as_falcon_config(config: object) -> FalconConfig:
    """`config` itself, or a transformers FalconConfig (tests, in-memory models) read by `read_config`."""
    if isinstance(config, FalconConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"expected a FalconConfig or a transformers config, got {type(config).__name__}")
    return read_config(to_dict())


class FalconAttention(nn.Module):
    """The fused q/k/v projection split per layout, rotary positions, grouped-query attention through the cache."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.groups = self.heads // self.kv_heads
        self.layout = config.qkv_layout
        self.scaling = self.head_dim**-0.5
        hidden = config.hidden_size
        fused = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(hidden, fused, bias=config.qkv_bias)
        self.dense = nn.Linear(hidden, hidden, bias=config.o_bias)

    def _split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q `[B, heads, t, d]`, k and v `[B, kv_heads, t, d]` from the fused projection `[B, t, ...]`."""
        batch, t, _ = fused.shape
        d = self.head_dim
        if self.layout == "grouped":
            qkv = fused.view(batch, t, self.kv_heads, self.groups + 2, d)
            q, k, v = qkv[:, :, :, :-2].reshape(batch, t, self.heads, d), qkv[:, :, :, -2], qkv[:, :, :, -1]
        elif self.layout == "multi_query":
            qkv = fused.view(batch, t, self.heads + 2, d)
            q, k, v = qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
        else:  # interleaved
            qkv = fused.view(batch, t, self.heads, 3, d)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, prepared: Prepared, kv: LayerSlot | None) -> torch.Tensor:
        batch, t, _ = x.shape
        q, k, v = self._split(self.query_key_value(x))
        cos, sin = prepared.cos, prepared.sin
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv is not None:
            k, v = kv.update(k, v)
        mask = prepared.mask(None)
        if self.groups > 1:
            if t == 1:  # decode: fold the query heads of a group onto their kv head instead of copying keys
                q = q.reshape(batch, self.kv_heads, self.groups, self.head_dim)
            else:
                k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        out = out.reshape(batch, self.heads, t, self.head_dim).transpose(1, 2).reshape(batch, t, -1)
        projected: torch.Tensor = self.dense(out)
        return projected


class FalconMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x)))."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.dense_h_to_4h = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.dense_4h_to_h = nn.Linear(inner, hidden, bias=config.mlp_bias)
        self.act = SUPPORTED_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))
        return out


class FalconBlock(nn.Module):
    """One Falcon layer; the additions follow transformers' order (mlp + attn, then + residual) to stay exact."""

    def __init__(self, config: FalconConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.norms = config.norms
        self.self_attention = FalconAttention(config)
        self.mlp = FalconMLP(config)
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        if self.norms == "ln_attn+ln_mlp":
            self.ln_attn = nn.LayerNorm(hidden, eps=eps)
            self.ln_mlp = nn.LayerNorm(hidden, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
            if self.norms == "input+post_attention":
                self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, hidden: torch.Tensor, prepared: Prepared, kv: LayerSlot | None = None) -> torch.Tensor:
        if self.norms == "ln_attn+ln_mlp":
            attn_in, mlp_in = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden)
        attn = self.self_attention(attn_in, prepared, kv)
        if self.norms == "input+post_attention":  # sequential: attention's residual first, then the MLP's
            hidden = hidden + attn
            out: torch.Tensor = hidden + self.mlp(self.post_attention_layernorm(hidden))
            return out
        summed: torch.Tensor = hidden + (self.mlp(mlp_in) + attn)
        return summed


class ClientParts(base.ClientPartsBase):
    """Word embeddings, final LayerNorm and head (tied to the embeddings unless `tie_word_embeddings` is false)."""

    def __init__(self, config: object) -> None:
        super().__init__()
        cfg = as_falcon_config(config)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.word_embeddings(input_ids)
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.ln_f(hidden)
        return F.linear(hidden, self.word_embeddings.weight) if self.lm_head is None else self.lm_head(hidden)


class FalconFamily(DecoderFamily):
    """The family interface with Falcon's blocks, names and client parts; decoder.py's runner (rope and masks)."""

    CLIENT_PREFIXES = CLIENT_PREFIXES
    ClientParts = ClientParts  # type: ignore[assignment]

    @staticmethod
    def make_block(config: object, index: int) -> nn.Module:
        return FalconBlock(as_falcon_config(config), index)

    @staticmethod
    def block_prefix(index: int) -> str:
        return f"transformer.h.{index}."

    @staticmethod
    def client_param_names(config: object) -> dict[str, str]:
        with torch.device("meta"):
            parts = ClientParts(config)
        return base.names_by_prefix(parts, CLIENT_PREFIXES)

    @staticmethod
    def kv_shape(config: object) -> tuple[int, int]:
        cfg = as_falcon_config(config)
        return cfg.num_key_value_heads, cfg.head_dim


FAMILY = FalconFamily(read_config)
