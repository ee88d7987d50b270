"""Tiny random models (seeded) for unit tests: real transformers classes, a few hundred KB of weights."""

from __future__ import annotations

import torch
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 128


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """A random Llama with SmolLM2's shape ratios (GQA 4/2 heads) small enough for unit tests."""
    torch.manual_seed(seed)
    cfg = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=6,
        vocab_size=TINY_VOCAB,
        initializer_range=0.1,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    )
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def tiny_bloom(seed: int = 0, **overrides: object) -> BloomForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, n_head=4, n_layer=6, vocab_size=TINY_VOCAB, initializer_range=0.1)
    return BloomForCausalLM(BloomConfig(**{**cfg, **overrides})).eval()
