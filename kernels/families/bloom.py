"""BLOOM blocks, reusing transformers' `BloomBlock` (ALiBi positions, fused QKV, always eager attention).

The one family that still imports transformers: this module is imported only when a BLOOM model is used.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BloomConfig
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from ..cache import LayerSlot
from . import base

# ClientParts state-dict prefix -> checkpoint prefix (checkpoints saved from BloomForCausalLM). BLOOM ties its
# head to the word embeddings; an untied config gets its own lm_head.
CLIENT_PREFIXES: dict[str, str] = {
    "word_embeddings.": "transformer.word_embeddings.",
    "word_embeddings_layernorm.": "transformer.word_embeddings_layernorm.",
    "ln_f.": "transformer.ln_f.",
    "lm_head.": "lm_head.",
}


def read_config(fields: Mapping[str, Any]) -> BloomConfig:
    """config.json's fields as transformers' `BloomConfig` (what `AutoConfig` would give)."""
    return BloomConfig.from_dict(dict(fields))


def make_block(config: BloomConfig, index: int) -> nn.Module:
    """One BLOOM block for absolute layer `index` on the current default device (its attention is always eager)."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    return BloomBlock(config, layer_idx=index)


def block_prefix(index: int) -> str:
    return f"transformer.h.{index}."


def kv_shape(config: BloomConfig) -> tuple[int, int]:
    return config.n_head, config.hidden_size // config.n_head


class ClientParts(base.ClientPartsBase):
    """Word embeddings (+ their layernorm), final layernorm and head: the parts that stay with the client."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        tied = bool(config.tie_word_embeddings)
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.ln_f(hidden)
        return F.linear(hidden, self.word_embeddings.weight) if self.lm_head is None else self.lm_head(hidden)


def client_param_names(config: BloomConfig) -> dict[str, str]:
    with torch.device("meta"):
        parts = ClientParts(config)
    return base.names_by_prefix(parts, CLIENT_PREFIXES)


class BlockRunner:
    """Feeds BLOOM blocks a causal mask and the ALiBi bias built from the full key mask."""

    def __init__(self, config: BloomConfig) -> None:
        self.num_heads = config.n_head

    def prepare(self, attention_mask: torch.Tensor, t: int, dtype: torch.dtype) -> dict[str, object]:
        return {
            "attention_mask": base.causal_mask(attention_mask, t, dtype),
            "alibi": build_alibi_tensor(attention_mask, self.num_heads, dtype),
        }

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, prepared: dict[str, object], kv: LayerSlot | None
    ) -> torch.Tensor:
        out: torch.Tensor = block(hidden, layer_past=kv, use_cache=kv is not None, **prepared)[0]
        return out
