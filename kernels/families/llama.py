"""Llama 2/3/3.x and SmolLM2: the plain decoder block (`decoder.py`), optional biases, rope default/linear/llama3."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .decoder import DecoderConfig, DecoderFamily

__all__ = ["FAMILY", "read_config"]

# transformers' LlamaConfig defaults for the fields a block reads
DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def read_config(fields: Mapping[str, Any]) -> DecoderConfig:
    """`attention_bias` puts biases on q/k/v/o, `mlp_bias` on the MLP; no sliding windows, no q/k norms."""
    merged = {**DEFAULTS, **fields}
    bias = bool(merged["attention_bias"])
    return DecoderConfig.from_fields(merged, qkv_bias=bias, o_bias=bias, mlp_bias=bool(merged["mlp_bias"]))


FAMILY = DecoderFamily(read_config)
