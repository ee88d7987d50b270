"""Qwen3 (dense): the Llama block with RMSNorms on each query and key head (`q_norm`, `k_norm`) before the rotation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .decoder import DecoderConfig, DecoderFamily, qwen_layer_windows

__all__ = ["FAMILY", "read_config"]

# transformers' Qwen3Config defaults for the fields a block reads (head_dim is 128 unless given)
DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}


def read_config(fields: Mapping[str, Any]) -> DecoderConfig:
    """`attention_bias` puts biases on q/k/v/o."""
    merged = {**DEFAULTS, **fields}
    bias = bool(merged["attention_bias"])
    return DecoderConfig.from_fields(
        merged, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=qwen_layer_windows(merged)
    )


FAMILY = DecoderFamily(read_config)
