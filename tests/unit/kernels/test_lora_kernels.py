"""kernels/lora.py against PEFT: same logits and same gradients (inputs and LoRA weights) on every tiny family.

Reference: `peft.get_peft_model` on one copy of a tiny random model (random nonzero A and B); ours: the same
weights as a `Lora`, applied by `apply_lora` to the blocks of a second, untouched copy run through `Span`.
fp32, tolerance TOL on max |diff| / max(1, max |ref|) (measured: Llama <= 8.5e-7, BLOOM 0, outputs and grads).
"""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from torch import nn

from petal.kernels.int8 import Int8Linear, quantize_span
from petal.kernels.lora import apply_lora, check_lora, linear_layers, lora_targets
from petal.kernels.span import Span
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora
from tests.support.tinymodels import (
    tiny_bloom,
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

TOL = 1e-5
INT8_TOL = 0.03  # int8 weights + bf16 activations vs the fp32 dequantized reference (measured 2e-3..1e-2)
RANK, ALPHA = 4, 8


def close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> bool:
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    print(f"max rel |diff| = {err:.2e} (tol {tol})")
    return err <= tol


def peft_model(model: nn.Module, targets: list[str]) -> nn.Module:
    torch.manual_seed(11)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, init_lora_weights=False
    )  # random nonzero B, so the LoRA path matters
    return peft.get_peft_model(model, config)


_PEFT_KEY = re.compile(r".*\.(?:layers|h)\.(\d+)\.(.+)\.lora_(A|B)\.default\.weight$")


def our_lora(pm: nn.Module) -> tuple[Lora, dict[str, torch.Tensor]]:
    """The PEFT model's adapter as a `Lora` of fresh leaves, and our key -> PEFT parameter (for grads)."""
    weights, params = {}, {}
    for name, p in pm.named_parameters():
        m = _PEFT_KEY.fullmatch(name)
        if m:
            key = f"{m.group(1)}.{m.group(2)}.lora_{m.group(3)}"
            weights[key] = p.detach().clone().requires_grad_(True)
            params[key] = p
    return Lora(ALPHA / RANK, weights), params


CASES = {
    "llama": (
        tiny_llama,
        ["q_proj", "v_proj"],
        lambda m: m.model.layers,
        lambda m, x: x,
        lambda m, h: m.lm_head(m.model.norm(h)),
    ),
    # the other Llama-like families: same block code, their own biases / q-k norms / sliding windows
    **{
        name: (
            make,
            ["q_proj", "v_proj", "down_proj"],
            lambda m: m.model.layers,
            lambda m, x: x,
            lambda m, h: m.lm_head(m.model.norm(h)),
        )
        for name, make in (("mistral", tiny_mistral), ("qwen2", tiny_qwen2), ("qwen3", tiny_qwen3))
    },
    # Mixtral: the attention of the Llama-likes around a mixture of experts (transformers 5 fuses its experts into
    # 3-D tensors PEFT cannot target by name, so the LoRA here is on the attention)
    "mixtral": (
        tiny_mixtral,
        ["q_proj", "v_proj", "o_proj"],
        lambda m: m.model.layers,
        lambda m, x: x,
        lambda m, h: m.lm_head(m.model.norm(h)),
    ),
    # Falcon, both layouts: fused query_key_value (grouped / multi-query), LayerNorm, GELU MLP (biases on 7b)
    **{
        name: (
            make,
            ["query_key_value", "dense", "dense_4h_to_h"],
            lambda m: m.transformer.h,
            lambda m, x: x,
            lambda m, h: m.lm_head(m.transformer.ln_f(h)),
        )
        for name, make in (("falcon", tiny_falcon), ("falcon-7b", tiny_falcon_7b))
    },
    "bloom": (
        tiny_bloom,
        ["query_key_value"],
        lambda m: m.transformer.h,
        lambda m, x: m.transformer.word_embeddings_layernorm(x),
        lambda m, h: m.lm_head(m.transformer.ln_f(h)),
    ),
    # Gemma 2: its own block (sandwich norms, soft-capped attention); the head soft-caps the logits as transformers
    "gemma2": (
        tiny_gemma2,
        ["q_proj", "o_proj", "up_proj", "down_proj"],
        lambda m: m.model.layers,
        lambda m, x: x,
        lambda m, h: 3.0 * torch.tanh(m.lm_head(m.model.norm(h)) / 3.0),  # tiny_gemma2's final_logit_softcapping
    ),
    "gemma3": (
        tiny_gemma3,
        ["q_proj", "k_proj", "gate_proj"],
        lambda m: m.model.layers,
        lambda m, x: x,
        lambda m, h: m.lm_head(m.model.norm(h)),
    ),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_matches_peft_outputs_and_grads(family: str) -> None:
    make, targets, _layers_of, pre, head = CASES[family]
    plain = make()
    pm = peft_model(make(), targets)
    lora, params = our_lora(pm)
    assert len(lora.weights) == 2 * len(targets) * plain.config.num_hidden_layers
    torch.manual_seed(5)
    embeds = torch.randn(2, 7, 64)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding on one row
    grad_logits = torch.randn(2, 7, plain.config.vocab_size) * mask[..., None]  # padded rows carry no loss

    x_ref = embeds.clone().requires_grad_(True)
    ref = pm(inputs_embeds=x_ref, attention_mask=mask).logits
    ref_grads = torch.autograd.grad(ref, [x_ref, *params.values()], grad_logits)

    span = Span.from_model(plain, 0, plain.config.num_hidden_layers)
    for p in plain.parameters():
        p.requires_grad_(False)  # as on a server: frozen weights
    x = embeds.clone().requires_grad_(True)
    with apply_lora(lora, enumerate(span.blocks)):
        got = head(plain, span(pre(plain, x), mask))
    got_grads = torch.autograd.grad(got, [x, *lora.weights.values()], grad_logits)

    assert close(got[mask.bool()], ref[mask.bool()])
    assert close(got_grads[0], ref_grads[0])
    for key, g, r in zip(lora.weights, got_grads[1:], ref_grads[1:], strict=True):
        assert g.shape == lora.weights[key].shape
        assert close(g, r), key
    # outside the `with`, the blocks are the plain model again
    with torch.no_grad():
        after = head(plain, span(pre(plain, embeds), mask))
        base = pm.get_base_model()
        with pm.disable_adapter():
            want = base(inputs_embeds=embeds, attention_mask=mask).logits
    assert close(after[mask.bool()], want[mask.bool()])
    assert not close(after[mask.bool()], ref[mask.bool()].detach(), 1e-3)  # the LoRA did change the result


def test_subset_of_blocks_and_absolute_indices() -> None:
    """Blocks are addressed by absolute index: a span [2, 4) applies keys 2.* and 3.* only."""
    model = tiny_llama()
    span = Span.from_model(model, 2, 4)
    g = torch.Generator().manual_seed(0)
    lora = Lora(
        1.0,
        {
            "3.mlp.down_proj.lora_A": torch.randn(2, 128, generator=g),
            "3.mlp.down_proj.lora_B": torch.randn(64, 2, generator=g),
        },
    )
    x = torch.randn(1, 5, 64, generator=g)
    with torch.no_grad():
        base = span(x)
        with apply_lora(lora, zip(range(2, 4), span.blocks, strict=True)):
            with_lora = span(x)
        # the reference: block 3's down_proj with the LoRA merged into its weight
        merged = copy.deepcopy(model)
        layer = merged.model.layers[3].mlp.down_proj
        layer.weight += lora.weights["3.mlp.down_proj.lora_B"] @ lora.weights["3.mlp.down_proj.lora_A"]
        want = Span.from_model(merged, 2, 4)(x)
    assert close(with_lora, want) and not close(with_lora, base, 1e-3)


def test_errors_name_the_key_and_leave_no_hooks() -> None:
    model = tiny_llama()
    span = Span.from_model(model, 0, 2)
    blocks = list(enumerate(span.blocks))
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)
    cases = [
        (Lora(1.0, {"5.self_attn.q_proj.lora_A": a, "5.self_attn.q_proj.lora_B": b}), "bad_request", "block 5"),
        (
            Lora(1.0, {"1.self_attn.qq_proj.lora_A": a, "1.self_attn.qq_proj.lora_B": b}),
            "bad_request",
            "'1.self_attn.qq_proj'.*LoRA-able modules are mlp.down_proj",
        ),
        (
            Lora(1.0, {"1.self_attn.k_proj.lora_A": a, "1.self_attn.k_proj.lora_B": b}),
            "wrong_shape",
            "'1.self_attn.k_proj'.*32 out",
        ),  # k_proj is 64 -> 32 (GQA)
        (Lora(1.0, {"0.mlp.down_proj.lora_A": a, "0.mlp.down_proj.lora_B": b}), "wrong_shape", "128 in"),
    ]
    for lora, code, match in cases:
        with pytest.raises(PetalError, match=match) as e:
            check_lora(lora, blocks)
        assert e.value.code == code
        with pytest.raises(PetalError), apply_lora(lora, blocks):
            pass
    ok = Lora(1.0, {"0.self_attn.q_proj.lora_A": torch.ones(2, 64), "0.self_attn.q_proj.lora_B": torch.ones(64, 2)})
    with pytest.raises(RuntimeError, match="boom"), apply_lora(ok, blocks):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_fire_only_on_their_thread() -> None:
    import threading

    model = tiny_llama()
    span = Span.from_model(model, 0, 1)
    lora = Lora(1.0, {"0.self_attn.o_proj.lora_A": torch.ones(1, 64), "0.self_attn.o_proj.lora_B": torch.ones(64, 1)})
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        base = span(x)
        other: list[torch.Tensor] = []
        with apply_lora(lora, [(0, span.blocks[0])]):
            t = threading.Thread(target=lambda: other.append(span(x)))
            t.start()
            t.join()
            mine = span(x)
    assert torch.equal(other[0], base) and not close(mine, base, 1e-3)


def test_int8_blocks() -> None:
    """The same hooks on CPU Int8Linear layers: close to fp32 layers holding the dequantized weights."""
    model = tiny_llama()
    q = quantize_span(Span.from_model(copy.deepcopy(model), 0, 3), "cpu")
    ref = Span.from_model(copy.deepcopy(model), 0, 3)
    for qb, rb in zip(q.blocks, ref.blocks, strict=True):
        for path, layer in linear_layers(qb).items():
            assert isinstance(layer, Int8Linear)
            rb.get_submodule(path).weight.data = layer.dequantized_weight()
    g = torch.Generator().manual_seed(3)
    weights = {}
    for i in range(3):
        for path in ("self_attn.q_proj", "self_attn.v_proj"):
            out = 64 if path.endswith("q_proj") else 32
            weights[f"{i}.{path}.lora_A"] = (0.1 * torch.randn(4, 64, generator=g)).requires_grad_(True)
            weights[f"{i}.{path}.lora_B"] = (0.1 * torch.randn(out, 4, generator=g)).requires_grad_(True)
    lora = Lora(2.0, weights)
    x = torch.randn(2, 6, 64, generator=g)
    grad_out = torch.randn(2, 6, 64, generator=g)
    results = []
    for span in (q, ref):
        xi = x.clone().requires_grad_(True)
        with apply_lora(lora, enumerate(span.blocks)):
            out = span(xi)
        results.append((out, torch.autograd.grad(out, [xi, *weights.values()], grad_out)))
    (q_out, q_grads), (r_out, r_grads) = results
    assert close(q_out, r_out, INT8_TOL)
    for g_q, g_r in zip(q_grads, r_grads, strict=True):
        assert close(g_q, g_r, INT8_TOL)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            tiny_llama,
            {
                "self_attn.q_proj": (64, 64),
                "self_attn.k_proj": (64, 32),
                "self_attn.v_proj": (64, 32),
                "self_attn.o_proj": (64, 64),
                "mlp.gate_proj": (64, 128),
                "mlp.up_proj": (64, 128),
                "mlp.down_proj": (128, 64),
            },
        ),
        (
            tiny_bloom,
            {
                "self_attention.query_key_value": (64, 192),
                "self_attention.dense": (64, 64),
                "mlp.dense_h_to_4h": (64, 256),
                "mlp.dense_4h_to_h": (256, 64),
            },
        ),
    ],
)
def test_lora_targets(make, expected) -> None:
    assert lora_targets(make().config) == expected
