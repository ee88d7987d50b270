"""Llama-family blocks (Llama 2/3, SmolLM2, Mistral-like GQA), reusing transformers' `LlamaDecoderLayer`."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from ..cache import LayerSlot
from . import base

ATTN_IMPLEMENTATION = "sdpa"

# ClientParts state-dict prefix -> checkpoint prefix. With tied embeddings there is no lm_head (the head reuses
# embed_tokens.weight), so loading with `assign=True` cannot silently untie them.
CLIENT_PREFIXES: dict[str, str] = {
    "embed_tokens.": "model.embed_tokens.",
    "norm.": "model.norm.",
    "lm_head.": "lm_head.",
}


def _block_config(config: LlamaConfig) -> LlamaConfig:
    config = copy.deepcopy(config)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def make_block(config: LlamaConfig, index: int) -> nn.Module:
    """One decoder layer for absolute layer `index`, with sdpa attention, on the current default device."""
    return LlamaDecoderLayer(_block_config(config), layer_idx=index)


def block_prefix(index: int) -> str:
    return f"model.layers.{index}."


def kv_shape(config: LlamaConfig) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads  # LlamaConfig fills None the same way
    return kv_heads, int(head_dim)


class ClientParts(base.ClientPartsBase):
    """Embeddings, final norm and head: the parts that stay with the client."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.tied = bool(config.tie_word_embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.embed_tokens(input_ids)
        return embeds

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)


def client_param_names(config: LlamaConfig) -> dict[str, str]:
    with torch.device("meta"):
        parts = ClientParts(config)
    return base.names_by_prefix(parts, CLIENT_PREFIXES)


class BlockRunner:
    """Feeds Llama layers a causal mask, position ids and the rotary (cos, sin) they expect."""

    def __init__(self, config: LlamaConfig) -> None:
        # Built on CPU whatever the default device is (spans may be built under meta); the rotary module moves
        # its tiny inv_freq to the input's device on every call.
        with torch.device("cpu"):
            self.rotary = LlamaRotaryEmbedding(_block_config(config))

    def prepare(self, attention_mask: torch.Tensor, t: int, dtype: torch.dtype) -> dict[str, object]:
        positions = base.position_ids(attention_mask)[:, -t:]
        probe = torch.empty(0, dtype=dtype, device=attention_mask.device)
        return {
            "attention_mask": base.causal_mask(attention_mask, t, dtype),
            "position_ids": positions,
            "position_embeddings": self.rotary(probe, positions),
        }

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, prepared: dict[str, object], kv: LayerSlot | None
    ) -> torch.Tensor:
        out: torch.Tensor = block(hidden, past_key_values=kv, use_cache=kv is not None, **prepared)
        return out
