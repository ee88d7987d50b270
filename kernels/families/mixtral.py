"""Mixtral: Mistral's attention (`decoder.Attention`, sliding window as Mistral) with a sparse mixture-of-experts MLP.

The MoE MLP keeps the classic checkpoint layout, the one real Hub checkpoints (Mixtral-8x7B, 8x22B) have and the one
transformers (4.x, and 5.x on `save_pretrained`) writes: `block_sparse_moe.gate` (the router, `[experts, hidden]`)
and `block_sparse_moe.experts.{e}.w1/w2/w3` (gate, down and up projections of expert e). Every expert projection is
its own `nn.Linear`, so int8 (`kernels/int8.py`) quantizes the experts and a LoRA can target any of them by name.
transformers 5 keeps the experts in memory as fused 3-D tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`);
`FAMILY.adopt_layer` turns such an in-memory layer into our block with views of those tensors (`Span.from_model`).
A checkpoint *saved* with fused tensors is not read (the store reports the missing `w1` tensor).

Routing follows transformers exactly: softmax over all experts in float32, the top `num_experts_per_tok`, their
weights renormalized to sum to 1 (= a softmax over the top-k), experts run in ascending order on the tokens routed to
them and summed with `index_add_`. Only the experts some token picked run, so a decode step costs `k` experts.

The router is a `Router` (an `nn.Linear` subclass): int8 leaves it in full precision (it is `experts x hidden`,
tiny, and a flipped expert choice costs far more quality than its bytes); LoRA can still target it
(`block_sparse_moe.gate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..cache import LayerSlot
from .decoder import (
    SUPPORTED_ACTIVATIONS,
    Attention,
    DecoderConfig,
    DecoderFamily,
    Prepared,
    RMSNorm,
    as_decoder_config,
)

__all__ = ["FAMILY", "MixtralBlock", "Router", "SparseMoE", "read_config"]

# transformers' MixtralConfig defaults for the fields a block reads (no sliding window unless given; rope theta 1e6)
DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096 * 32,
    "tie_word_embeddings": False,
    "num_key_value_heads": 8,
    "sliding_window": None,
    "rope_theta": 1e6,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def read_config(fields: Mapping[str, Any]) -> DecoderConfig:
    """The Mistral reading plus the expert counts (`num_local_experts`, `num_experts_per_tok`, read as attributes)."""
    merged = {**DEFAULTS, **fields}
    experts, top_k = int(merged["num_local_experts"]), int(merged["num_experts_per_tok"])
    if not 1 <= top_k <= experts:
        raise ValueError(f"num_experts_per_tok {top_k} must be between 1 and num_local_experts {experts}")
    merged["num_local_experts"], merged["num_experts_per_tok"] = experts, top_k
    window = merged["sliding_window"]
    return DecoderConfig.from_fields(merged, sliding_windows=[window] * int(merged["num_hidden_layers"]))


class Router(nn.Linear):
    """The expert router: a plain linear map to one logit per expert. Its own class so int8 keeps it in full
    precision (`quantize_module` swaps only exact `nn.Linear`s); LoRA hooks it like any linear."""


class Expert(nn.Module):
    """One expert: the gated MLP with Mixtral's names, w2(act(w1(x)) * w3(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)
        self.act = SUPPORTED_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w2(self.act(self.w1(x)) * self.w3(x))
        return out


class SparseMoE(nn.Module):
    """Top-k routing over `num_local_experts` experts; each token's output is the weighted sum of its k experts."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.top_k = int(config.num_experts_per_tok)
        num_experts = int(config.num_local_experts)
        self.gate = Router(config.hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config) for _ in range(num_experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [tokens, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)  # float32, as transformers keeps them
        out = torch.zeros_like(flat)
        with torch.no_grad():
            hit = torch.unique(chosen).tolist()  # ascending: the same summation order as transformers
        for index in hit:
            token, slot = torch.where(chosen == index)
            expert_out = self.experts[index](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, expert_out.to(out.dtype))
        return out.reshape(shape)


class MixtralBlock(nn.Module):
    """One pre-norm layer: x + attn(norm(x)), then + moe(norm(.)); the attention is decoder.py's (GQA, rope, window)."""

    def __init__(self, config: DecoderConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = Attention(config, config.sliding_windows[index])
        self.block_sparse_moe = SparseMoE(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, prepared: Prepared, kv: LayerSlot | None = None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), prepared, kv)
        out: torch.Tensor = hidden + self.block_sparse_moe(self.post_attention_layernorm(hidden))
        return out


def _leaf_param(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A parameter sharing `tensor`'s memory (a view of a fused transformers tensor)."""
    return nn.Parameter(tensor.detach(), requires_grad=like.requires_grad)


class MixtralFamily(DecoderFamily):
    """decoder.py's family interface with the MoE block (same client parts, runner, KV shape, checkpoint prefixes)."""

    @staticmethod
    def make_block(config: object, index: int) -> nn.Module:
        return MixtralBlock(as_decoder_config(config), index)

    @staticmethod
    def adopt_layer(config: object, layer: nn.Module, index: int) -> nn.Module:
        """Our block holding the memory of transformers' `MixtralDecoderLayer` `layer` (for `Span.from_model`).

        Attention Linears and norms are taken over whole (hooks on them fire); the router weight is shared and the
        experts are views of transformers 5's fused tensors (`gate_up_proj[e]` = w1 over w3, `down_proj[e]` = w2)."""
        with torch.device("meta"):
            block = MixtralBlock(as_decoder_config(config), index)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.self_attn, name, getattr(layer.self_attn, name))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(block, norm).weight = getattr(layer, norm).weight
        moe = block.block_sparse_moe
        theirs: Any = layer.get_submodule("mlp" if hasattr(layer, "mlp") else "block_sparse_moe")
        moe.gate.weight = theirs.gate.weight
        fused, down = getattr(theirs.experts, "gate_up_proj", None), getattr(theirs.experts, "down_proj", None)
        if not (isinstance(fused, torch.Tensor) and isinstance(down, torch.Tensor)):
            raise ValueError(f"block {index}: expected transformers 5's fused experts (gate_up_proj, down_proj)")
        inner = fused.shape[1] // 2
        expert: Any
        for e, expert in enumerate(moe.experts):
            expert.w1.weight = _leaf_param(fused[e, :inner], fused)
            expert.w3.weight = _leaf_param(fused[e, inner:], fused)
            expert.w2.weight = _leaf_param(down[e], down)
        stale = [name for name, p in block.named_parameters() if p.is_meta]
        if stale:
            raise ValueError(f"block {index}: {type(layer).__name__} has no tensors for {stale}")
        return block


FAMILY = MixtralFamily(read_config)
