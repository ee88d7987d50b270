"""Tiny random models (seeded) for unit tests: real transformers classes, a few hundred KB of weights."""

from __future__ import annotations

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
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


def tiny_gemma2(seed: int = 0, **overrides: object) -> Gemma2ForCausalLM:
    """A random Gemma 2: head_dim 32 != hidden / heads, even layers with a sliding window of 4 (shorter than the test
    sequences), attention and final soft-caps low enough (5 and 3) to bite on these activations, norms not at their
    identity (random weights)."""
    torch.manual_seed(seed)
    cfg = {
        **_SHAPE,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": 4,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
    }
    model = Gemma2ForCausalLM(Gemma2Config(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # transformers initializes Gemma norm weights to 0 (scale 1); make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model


def tiny_mixtral(seed: int = 0, **overrides: object) -> MixtralForCausalLM:
    """A random Mixtral: 4 experts, top-2 routing, sliding window 4 (shorter than the test sequences)."""
    torch.manual_seed(seed)
    cfg = {**_SHAPE, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4}
    return MixtralForCausalLM(MixtralConfig(**{**cfg, **overrides})).eval()


_FALCON_SHAPE = dict(
    hidden_size=64, num_attention_heads=4, num_hidden_layers=6, vocab_size=TINY_VOCAB, initializer_range=0.1
)


def tiny_falcon(seed: int = 0, **overrides: object) -> FalconForCausalLM:
    """A random Falcon-40B/180B layout: `new_decoder_architecture`, 2 grouped kv heads, `ln_attn` and `ln_mlp`."""
    torch.manual_seed(seed)
    cfg = {**_FALCON_SHAPE, "new_decoder_architecture": True, "num_kv_heads": 2}
    return FalconForCausalLM(FalconConfig(**{**cfg, **overrides})).eval()


def tiny_falcon_7b(seed: int = 0, **overrides: object) -> FalconForCausalLM:
    """A random Falcon-7B layout (multi-query attention, one `input_layernorm`, `parallel_attn`), with biases on."""
    torch.manual_seed(seed)
    cfg = {**_FALCON_SHAPE, "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True}
    return FalconForCausalLM(FalconConfig(**{**cfg, "bias": True, "tie_word_embeddings": False, **overrides})).eval()


def tiny_gemma3(seed: int = 0, **overrides: object) -> Gemma3ForCausalLM:
    """A random Gemma 3 text model: q/k norms, layers 2 and 5 global (pattern 3) with linear rope scaling, the others
    sliding (window 4) with their own rope base; no soft-caps, as Gemma 3; random norm weights as in tiny_gemma2."""
    torch.manual_seed(seed)
    cfg = {
        **_SHAPE,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": 4,
        "sliding_window_pattern": 3,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model
