"""The Llama-like families through the model store: config.json read without transformers, spans exact against
transformers, int8 and LoRA on every family, and clear errors for what is not supported.

Block-level exactness (forward, KV-cache steps, padding, backward, greedy generation) of every family is in
test_kernels_span.py; LoRA against PEFT in test_lora_kernels.py.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from petal.kernels.families import SUPPORTED_FAMILIES, family_for, gemma2
from petal.kernels.families.decoder import DecoderConfig
from petal.kernels.families.gemma2 import GemmaConfig
from petal.kernels.int8 import Int8Linear
from petal.kernels.lora import apply_lora, lora_targets
from petal.kernels.store import ModelStoreError, load_client_parts, load_span, open_model
from petal.protocol.lora import Lora
from tests.support.tinymodels import (
    tiny_falcon,
    tiny_falcon_7b,
    tiny_gemma2,
    tiny_gemma3,
    tiny_llama,
    tiny_mistral,
    tiny_mixtral,
    tiny_qwen2,
    tiny_qwen3,
)

ATOL = 1e-5

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: tiny_llama(),
    "llama3-rope": lambda: tiny_llama(rope_parameters=LLAMA3_ROPE, max_position_embeddings=64, attention_bias=True),
    "mistral": lambda: tiny_mistral(),
    "qwen2": lambda: tiny_qwen2(),
    "qwen3": lambda: tiny_qwen3(),
    "gemma2": lambda: tiny_gemma2(),
    "gemma3": lambda: tiny_gemma3(),
    "mixtral": lambda: tiny_mixtral(),
    "falcon": lambda: tiny_falcon(),
    "falcon-7b": lambda: tiny_falcon_7b(),
    "falcon-seq": lambda: tiny_falcon_7b(multi_query=False, parallel_attn=False),  # q/k/v per head, sequential
}

# where they differ from the Llama-likes' 7 (q/k/v/o + gate/up/down): the linears per block that int8 replaces, and
# LoRA-able layers of the family (a LoRA below targets the first)
INT8_LINEARS = {"mixtral": 4 + 3 * 4, "falcon": 4, "falcon-7b": 4}  # Mixtral: 4 experts; its router stays fp
LORA_LAYERS = {
    "mixtral": ("block_sparse_moe.experts.1.w1", "block_sparse_moe.gate", "self_attn.v_proj"),
    "falcon": ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_4h_to_h"),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_store_spans_and_steps_equal_transformers(save_model, name: str) -> None:
    """open_model reads config.json itself; chained spans and cached steps give transformers' logits."""
    model = BUILDERS[name]()
    info = open_model(save_model(model))
    assert isinstance(info.config, DecoderConfig) and info.family == model.config.model_type
    parts = load_client_parts(info)
    spans = [load_span(info, a, b) for a, b in itertools.pairwise([0, 2, 5, 6])]
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        hidden = parts.embed(ids)
        for span in spans:
            hidden = span(hidden)
        forward_err = rel_err(parts.logits(hidden), want)
        caches = [s.new_cache(2, 12, torch.float32, "cpu") for s in spans]
        outs = []
        for a, b in [(0, 7), *((i, i + 1) for i in range(7, 12))]:  # prefill 7, then 5 decode steps
            hidden = parts.embed(ids[:, a:b])
            for span, cache in zip(spans, caches, strict=True):
                hidden = span.step(hidden, cache)
            outs.append(parts.logits(hidden))
        steps_err = rel_err(torch.cat(outs, 1), want)
    print(f"\n{name}: forward {forward_err:.2e}, steps {steps_err:.2e}")
    assert forward_err <= ATOL and steps_err <= ATOL


def test_config_reading_follows_transformers_defaults(save_model) -> None:
    """What each family's read_config derives: biases, q/k norms, per-layer windows, head_dim, rope scaling."""
    configs = {name: open_model(save_model(build(), name=name)).config for name, build in BUILDERS.items()}
    qwen2, qwen3, mistral, llama3 = configs["qwen2"], configs["qwen3"], configs["mistral"], configs["llama3-rope"]
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)
    assert qwen2.sliding_windows == (None, None, None, 4, 4, 4)
    assert (qwen3.qkv_bias, qwen3.o_bias, qwen3.qk_norm, qwen3.head_dim) == (True, True, True, 32)
    assert mistral.sliding_windows == (4,) * 6 and not mistral.qkv_bias
    assert (llama3.rope.type, llama3.rope.factor, llama3.rope.original_max_position_embeddings) == ("llama3", 8.0, 16)
    assert configs["llama"].eos_token_id == 2  # fields the blocks do not use stay readable
    mixtral = configs["mixtral"]
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok, mixtral.sliding_windows) == (4, 2, (4,) * 6)
    falcon, falcon_7b = configs["falcon"], configs["falcon-7b"]
    layouts = {n: (c.qkv_layout, c.norms, c.num_key_value_heads, c.qkv_bias) for n, c in configs.items() if "falc" in n}
    assert layouts == {
        "falcon": ("grouped", "ln_attn+ln_mlp", 2, False),
        "falcon-7b": ("multi_query", "input", 1, True),
        "falcon-seq": ("interleaved", "input+post_attention", 4, True),
    }
    assert falcon.intermediate_size == 4 * 64 and falcon.tie_word_embeddings and not falcon_7b.tie_word_embeddings
    with pytest.raises(AttributeError, match="no field 'nonexistent'"):
        _ = configs["llama"].nonexistent


def test_old_style_rope_fields_are_read(save_model) -> None:
    """config.json from transformers < 5: `rope_theta` beside `rope_scaling` with the `type` key."""
    path = save_model(tiny_llama(), name="old")
    fields = json.loads((path / "config.json").read_text())
    del fields["rope_parameters"]
    fields |= {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (path / "config.json").write_text(json.dumps(fields))
    rope = open_model(path).config.rope
    assert (rope.theta, rope.type, rope.factor) == (5e5, "linear", 2.0)


def test_unknown_family_and_rope_type_list_what_is_supported(save_model) -> None:
    path = save_model(tiny_llama())
    fields = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**fields, "model_type": "mamba"}))
    with pytest.raises(
        ModelStoreError, match="unsupported model family 'mamba': petal supports " + ", ".join(SUPPORTED_FAMILIES)
    ):
        open_model(path)
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (path / "config.json").write_text(json.dumps({**fields, "rope_parameters": yarn}))
    with pytest.raises(
        ModelStoreError, match="rope type 'yarn' is not supported: petal supports default, linear, llama3"
    ):
        open_model(path)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral", "falcon", "falcon-7b"])
def test_int8_and_lora_work_on_every_family(save_model, name: str) -> None:
    """int8 replaces every linear (q/k/v/o + 3 MLP) and stays close; a LoRA by module name changes the output and
    gets gradients, on the int8 span too."""
    model = BUILDERS[name]()
    info = open_model(save_model(model))
    fp32, int8 = load_span(info, 0, 3), load_span(info, 0, 3, quant="int8")
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 3 * INT8_LINEARS.get(name, 7)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # Gemma's post-attention / post-MLP norms rescale every sublayer output to unit RMS, which magnifies the
        # int8 + bf16 error of small outputs: measured 0.016..0.031 (Gemma 2), 0.025..0.030 (Gemma 3) over seeds 0..2
        # (0.009..0.013 for Mistral, Qwen2, Qwen3)
        assert rel_err(int8(x), fp32(x)) < (0.05 if name.startswith("gemma") else 0.03)
    targets = lora_targets(info.config)
    layers = LORA_LAYERS.get(info.config.model_type, ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert set(layers) <= set(targets)
    fan_in, fan_out = targets[layers[0]]
    a = torch.randn(2, fan_in, requires_grad=True)
    b = torch.randn(fan_out, 2, requires_grad=True)
    lora = Lora(1.0, {f"1.{layers[0]}.lora_A": a, f"1.{layers[0]}.lora_B": b})
    for span in (fp32, int8):
        with apply_lora(lora, zip(range(3), span.blocks, strict=True)):
            out = span(x)
        with torch.no_grad():
            assert rel_err(out, span(x)) > 1e-3  # the adapter did something
        ga, gb = torch.autograd.grad(out.sum(), [a, b])
        assert ga.abs().sum() > 0 and gb.abs().sum() > 0


def test_gemma2_config_reading(save_model) -> None:
    """Gemma 2's read_config: softcaps, `query_pre_attn_scalar`, `hidden_activation`, windows from `layer_types` or
    (older config.json files without it) transformers' rule that even layers slide; embedding models are refused."""
    path = save_model(tiny_gemma2(), name="gemma2")
    cfg = open_model(path).config
    assert isinstance(cfg, GemmaConfig) and cfg.tie_word_embeddings and cfg.head_dim == 32
    assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (24.0, 5.0, 3.0)
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.sliding_windows == (4, None) * 3
    fields = json.loads((path / "config.json").read_text())
    older = {k: v for k, v in fields.items() if k not in ("layer_types", "attn_logit_softcapping")}
    older = gemma2.read_config({**older, "num_hidden_layers": 3, "hidden_act": "gelu"})
    assert older.sliding_windows == (4, None, 4) and older.attn_logit_softcapping == 50.0  # transformers' default
    assert older.hidden_act == "gelu_pytorch_tanh"  # `hidden_activation` wins, as in transformers
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        gemma2.read_config({**fields, "use_bidirectional_attention": True})


def test_gemma3_config_reading(save_model) -> None:
    """Gemma 3 text: q/k norms, a rope per layer type (`rope_parameters`, or the older `rope_theta`, `rope_scaling`
    and `rope_local_base_freq`), global layers every `sliding_window_pattern`, no attention soft-capping."""
    path = save_model(tiny_gemma3(attn_logit_softcapping=9.0), name="gemma3")
    cfg = open_model(path).config
    assert isinstance(cfg, GemmaConfig) and cfg.qk_norm and cfg.attn_logit_softcapping is None
    assert cfg.sliding_windows == (4, 4, None) * 2 and cfg.final_logit_softcapping is None
    assert (cfg.rope.type, cfg.rope.theta, cfg.rope.factor) == ("linear", 1e6, 4.0)
    assert cfg.local_rope is not None and (cfg.local_rope.type, cfg.local_rope.theta) == ("default", 1e4)
    fields = json.loads((path / "config.json").read_text())
    older = {k: v for k, v in fields.items() if k not in ("layer_types", "rope_parameters", "sliding_window_pattern")}
    older |= {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_local_base_freq": 2e4}
    old = family_for("gemma3_text").read_config({**older, "num_hidden_layers": 7})
    assert old.sliding_windows == (4,) * 5 + (None, 4)  # transformers' default pattern: every 6th layer is global
    assert (old.rope.type, old.rope.theta, old.rope.factor) == ("linear", 5e5, 8.0)
    assert old.local_rope is not None and old.local_rope.theta == 2e4


def test_alibi_falcon_and_fused_mixtral_experts_are_refused(save_model) -> None:
    """ALiBi Falcon (falcon-rw) is refused when opened; a Mixtral dir whose experts are fused 3-D tensors (not what
    save_pretrained writes) names the classic tensor it lacks."""
    path = save_model(tiny_falcon_7b(), name="rw")
    fields = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**fields, "alibi": True}))
    with pytest.raises(ModelStoreError, match=r"Falcon with ALiBi positions .* is not supported"):
        open_model(path)
    model = tiny_mixtral(num_hidden_layers=1)
    path = save_model(model, name="fused")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    with pytest.raises(ModelStoreError, match=re.escape("lacks tensor 'model.layers.0.block_sparse_moe.")):
        load_span(open_model(path), 0, 1)


SERVER_PATH = textwrap.dedent(
    """
    import sys, torch
    from petal.kernels.store import load_span, open_model
    for path in sys.argv[1:]:
        info = open_model(path)
        info.fingerprint
        span = load_span(info, 1, 3)
        cache = span.new_cache(1, 8, torch.float32, "cpu")
        span.step(torch.randn(1, 5, span.hidden_size), cache)
        span.step(torch.randn(1, 1, span.hidden_size), cache)
        x = torch.randn(1, 4, span.hidden_size, requires_grad=True)
        span(x).sum().backward()
        assert x.grad is not None
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "sympy"))
    print("heavy modules:", heavy[:5])
    assert not heavy, heavy
    """
)


def test_server_path_never_imports_transformers(save_model) -> None:
    """A fresh interpreter that opens a model, loads a span and runs steps and a backward never imports
    transformers (nor sympy, which it drags in): that import alone cost a server ~1.5 s and ~100 MiB."""
    dirs = [str(save_model(build(), name=name)) for name, build in sorted(BUILDERS.items())]
    done = subprocess.run(
        [sys.executable, "-c", SERVER_PATH, *dirs], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy modules: []" in done.stdout


def test_weights_are_shared_by_from_model() -> None:
    """Span.from_model's blocks hold the model's very Linear modules (hooks on them fire) and parameters."""
    from petal.kernels.span import Span

    model = tiny_qwen3()
    span = Span.from_model(model, 1, 3)
    assert span.blocks[0].self_attn.q_norm.weight is model.model.layers[1].self_attn.q_norm.weight
    assert span.blocks[1].mlp.up_proj is model.model.layers[2].mlp.up_proj
    assert not any(p.is_meta for p in span.parameters())
