"""Mistral: the Llama block without biases, with sliding-window attention on every layer (`sliding_window`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .decoder import DecoderConfig, DecoderFamily

__all__ = ["FAMILY", "read_config"]

# transformers' MistralConfig defaults for the fields a block reads (a missing sliding_window means 4096, null: none)
DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096 * 32,
    "tie_word_embeddings": False,
    "num_key_value_heads": 8,
    "sliding_window": 4096,
}


def read_config(fields: Mapping[str, Any]) -> DecoderConfig:
    merged = {**DEFAULTS, **fields}
    window = merged["sliding_window"]
    return DecoderConfig.from_fields(merged, sliding_windows=[window] * int(merged["num_hidden_layers"]))


FAMILY = DecoderFamily(read_config)
