"""The block-server tests' shared reference: a tiny random 30-block Llama, transformers' hidden states as ground
truth, and the tolerances a served span must meet.

Blocks [a, b) must map `hidden_states[a]` to `hidden_states[b]` (b < num_layers: the last entry has the final norm);
fp32 with codec "none" must match within ATOL (relative to max |ref|), codec "q8" within Q8_TOL.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ATOL = 1e-5
Q8_TOL = 0.05  # 8-bit blockwise activations through 4-10 blocks: max |diff| / max |ref|
LAYERS, HIDDEN = 30, 64


def tiny_llama() -> LlamaForCausalLM:
    """30 blocks of hidden size 64 (GQA 4/2 heads), seeded: the same weights in every test and every daemon."""
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config).eval()


def hidden_states(ref: LlamaForCausalLM, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ref(inputs_embeds=embeds, output_hidden_states=True).hidden_states


def close(a: torch.Tensor, b: torch.Tensor, tol: float = ATOL) -> bool:
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    print(f"max rel |diff| = {err:.2e} (tol {tol})")
    return err <= tol
