"""Qwen2 and Qwen2.5: the Llama block with biases on q/k/v (not o), sliding windows only with `use_sliding_window`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .decoder import DecoderConfig, DecoderFamily, qwen_layer_windows

__all__ = ["FAMILY", "read_config"]

# transformers' Qwen2Config defaults for the fields a block reads
DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "num_key_value_heads": 32,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}


def read_config(fields: Mapping[str, Any]) -> DecoderConfig:
    merged = {**DEFAULTS, **fields}
    return DecoderConfig.from_fields(merged, qkv_bias=True, sliding_windows=qwen_layer_windows(merged))


FAMILY = DecoderFamily(read_config)
