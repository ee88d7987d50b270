"""Tiny GGUF files written with the `gguf` package from a tiny random Llama, the way llama.cpp's converter lays
them out (q/k rows permuted for its rotary layout, Q8_0 matrices, float32 norms, a small SentencePiece-style vocab)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from transformers import LlamaForCausalLM


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order (the inverse of what transformers' GGUF loader undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(
    model: LlamaForCausalLM, path: Path, qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0
) -> Path:
    """Write `model` (tied or untied head) as a GGUF file; 2-D weights quantized to `qtype`."""
    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(7 if qtype == GGMLQuantizationType.Q8_0 else 0)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(cfg.vocab_size - 3)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(cfg.vocab_size - 3)])
    w.add_token_types(
        [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.NORMAL] * (cfg.vocab_size - 3)
    )
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def add(name: str, t: torch.Tensor, quant: bool = True) -> None:
        a = t.detach().to(torch.float32).numpy()
        if quant and a.ndim == 2 and qtype != GGMLQuantizationType.F32:
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    sd = model.state_dict()
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", torch.from_numpy(_permute(sd[p + "self_attn.q_proj.weight"].numpy(), heads)))
        add(f"blk.{i}.attn_k.weight", torch.from_numpy(_permute(sd[p + "self_attn.k_proj.weight"].numpy(), kv)))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
