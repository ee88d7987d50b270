"""Tiny random models (seeded) for unit tests: real transformers classes, a few hundred KB of weights."""

from __future__ import annotations

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY_VOCAB = 128


_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=6,
    vocab_size=TINY_VOCAB,
    initializer_range=0.1,
)


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """A random Llama with SmolLM2's shape ratios (GQA 4/2 heads) small enough for unit tests."""
    torch.manual_seed(seed)
    cfg = {**_SHAPE, "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def tiny_mistral(seed: int = 0, **overrides: object) -> MistralForCausalLM:
    """A random Mistral whose sliding window (4) is shorter than the test sequences, so the window matters."""
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**{**_SHAPE, "sliding_window": 4, **overrides})).eval()


def tiny_qwen2(seed: int = 0, **overrides: object) -> Qwen2ForCausalLM:
    """A random Qwen2 (q/k/v biases); layers 3..5 use a sliding window of 4, as `max_window_layers` says."""
    torch.manual_seed(seed)
    cfg = {**_SHAPE, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 3}
    return Qwen2ForCausalLM(Qwen2Config(**{**cfg, **overrides})).eval()


def tiny_qwen3(seed: int = 0, **overrides: object) -> Qwen3ForCausalLM:
    """A random Qwen3 (q/k norms) with head_dim 32 != hidden / heads and biases on q/k/v/o."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**{**_SHAPE, "head_dim": 32, "attention_bias": True, **overrides})).eval()


def tiny_bloom(seed: int = 0, **overrides: object) -> BloomForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, n_head=4, n_layer=6, vocab_size=TINY_VOCAB, initializer_range=0.1)
    return BloomForCausalLM(BloomConfig(**{**cfg, **overrides})).eval()
