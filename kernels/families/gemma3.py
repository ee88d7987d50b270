"""Gemma 3 text (`gemma3_text`, e.g. gemma-3-1b): Gemma 2's block (`gemma2.py`) plus per-head q/k norms and a rope
per layer type.

What differs from Gemma 2, as transformers' Gemma3ForCausalLM computes it: `q_norm`/`k_norm` (Gemma RMSNorms over
each head) before the rotation; the sliding layers use their own rope (`rope_parameters["sliding_attention"]`, or
`rope_local_base_freq` in older config.json files; theta 10 000) and the global ones theirs (theta 1 000 000, with
`rope_scaling` such as `linear`); one global layer every `sliding_window_pattern` (6) layers unless `layer_types`
says otherwise; no attention soft-capping (transformers' Gemma 3 ignores `attn_logit_softcapping`) and, by default,
no final one. The multimodal `gemma3` checkpoints (vision tower, `language_model.` prefixes) are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .decoder import RopeConfig
from .gemma2 import GemmaConfig, GemmaFamily, read_gemma_config

__all__ = ["FAMILY", "read_config"]

# transformers' Gemma3TextConfig defaults for the fields a block reads
DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "pad_token_id": 0,
}
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0


def _ropes(fields: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """(global, sliding) rope: `rope_parameters` per layer type (transformers >= 5), or `rope_theta`,
    `rope_scaling` (global only) and `rope_local_base_freq` (older files)."""
    params = fields.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**(fields.get("rope_scaling") or {}), "rope_theta": fields.get("rope_theta")}
        local = {"rope_theta": fields.get("rope_local_base_freq")}
    full["rope_theta"] = full.get("rope_theta") or GLOBAL_THETA
    local["rope_theta"] = local.get("rope_theta") or LOCAL_THETA
    max_pos = fields.get("max_position_embeddings")
    read = [RopeConfig.from_fields({"rope_parameters": p, "max_position_embeddings": max_pos}) for p in (full, local)]
    return read[0], read[1]


def read_config(fields: Mapping[str, Any]) -> GemmaConfig:
    merged = {**DEFAULTS, **fields}
    rope, local_rope = _ropes(merged)
    return read_gemma_config(
        merged,
        DEFAULTS,
        pattern=int(merged.get("sliding_window_pattern") or 6),
        qk_norm=True,
        rope=rope,
        local_rope=None if local_rope == rope else local_rope,
        attn_logit_softcapping=False,
    )


FAMILY = GemmaFamily(read_config)
