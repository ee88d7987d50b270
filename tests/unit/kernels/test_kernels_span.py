"""Span and ClientParts match plain transformers exactly (fp32, same weights) for every supported family.

The builders cover each family and variant (rope types, biases, sliding windows, q/k norms, head_dim); every test
below runs on each: span forward, KV-cache steps, left padding, backward, greedy generation, bf16.

Each comparison states its tolerance and prints the measured max |diff| (run with -s to see the figures).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import BloomConfig, BloomForCausalLM, LlamaForCausalLM

from petal.kernels.families import SUPPORTED_FAMILIES, get_family
from petal.kernels.span import Span
from petal.protocol.errors import PetalError
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

# fp32 everywhere; the paths differ only in mask layout, op order and summation order. The tolerance is
# relative to the reference's largest magnitude (activations here reach ~10): |diff| <= ATOL * max(1, max|ref|).
ATOL = 1e-5
VOCAB = 128


def _llama(**kw: object) -> LlamaForCausalLM:
    default_rope = {"rope_type": "default", "rope_theta": 1e4}
    return tiny_llama(**{"tie_word_embeddings": False, "rope_parameters": default_rope, **kw})


def _bloom() -> BloomForCausalLM:
    return BloomForCausalLM(BloomConfig(hidden_size=64, n_head=4, n_layer=6, vocab_size=VOCAB, initializer_range=0.1))


BUILDERS = {
    "llama-gqa": _llama,
    # SmolLM2-135M's shape ratios: 9 heads / 3 kv heads, head_dim 16 here, tied embeddings, rope_theta 1e5.
    "llama-smol": lambda: _llama(
        hidden_size=144,
        intermediate_size=384,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    ),
    # Llama 3.1-style rope scaling (original context 16, so most frequencies are rescaled) and every bias on
    "llama3-rope": lambda: _llama(
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-linear-rope": lambda: _llama(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}),
    "mistral": lambda: tiny_mistral(tie_word_embeddings=False),  # sliding window 4 on every layer
    "qwen2": tiny_qwen2,  # q/k/v biases, sliding window 4 on layers 3..5
    "qwen3": tiny_qwen3,  # q/k norms, head_dim 32 != 64 / 4 heads, q/k/v/o biases
    "bloom": _bloom,
    "mixtral": tiny_mixtral,  # 4 experts, top-2, sliding window 4 on every layer
    "falcon": tiny_falcon,  # new_decoder_architecture: 2 grouped kv heads, ln_attn + ln_mlp, no biases
    "falcon-7b": tiny_falcon_7b,  # multi-query, one input_layernorm, parallel attention + MLP, biases, untied head
    "gemma2": tiny_gemma2,  # Gemma norms, soft-caps 5 / 3, window 4 on even layers, head_dim 32, scaled embeddings
    "gemma3": tiny_gemma3,  # + q/k norms, a rope per layer type (linear-scaled global), no soft-caps
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    m = BUILDERS[request.param]().eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    m.name = request.param
    return m


def client_parts(model: torch.nn.Module) -> torch.nn.Module:
    """ClientParts filled from the model's own checkpoint names, exactly as the model store does."""
    family = get_family(model.config)
    state = model.state_dict()
    parts = family.ClientParts(model.config)
    parts.load_state_dict({k: state[v] for k, v in family.client_param_names(model.config).items()})
    return parts.eval()


def maxdiff(name: str, model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    diff, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    print(f"\nMAXDIFF {model.name:10s} {name:28s} {diff:.3e} max|ref| {scale:6.2f} (tol {atol:g} x max(1,max|ref|))")
    assert diff <= atol * scale, f"{name}: max |diff| {diff} > {atol} x {scale}"


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_block_outputs(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states entering each block and leaving the last one, before the final norm (via a hook)."""
    inner = getattr(model, model.base_model_prefix)
    layers = inner.layers if hasattr(inner, "layers") else inner.h  # transformers' own blocks, not the span's
    seen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            first = model(input_ids, output_hidden_states=True).hidden_states[0]
    finally:
        for h in hooks:
            h.remove()
    return [first, *seen]


def test_unknown_family_lists_supported() -> None:
    with pytest.raises(ValueError, match="petal supports " + ", ".join(SUPPORTED_FAMILIES)):
        get_family(type("Cfg", (), {"model_type": "gpt2"})())


@pytest.mark.parametrize("model_type", SUPPORTED_FAMILIES)
def test_every_family_exposes_the_interface(model_type: str) -> None:
    family = get_family(type("Cfg", (), {"model_type": model_type})())
    for name in (
        "make_block",
        "block_prefix",
        "CLIENT_PREFIXES",
        "ClientParts",
        "client_param_names",
        "kv_shape",
        "BlockRunner",
    ):
        assert hasattr(family, name), f"family {model_type} lacks {name} (see petal.kernels.families.base)"
    assert family.block_prefix(7).endswith(".7.")


def test_client_parts_match_model(model: torch.nn.Module) -> None:
    parts = client_parts(model)
    x = ids(2, 9)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        embedded = parts.embed(x)
        maxdiff("ClientParts.embed", model, embedded, out.hidden_states[0], 0.0)
        final = reference_block_outputs(model, x)[-1]
        maxdiff("ClientParts.logits", model, parts.logits(final), out.logits)
    names = get_family(model.config).client_param_names(model.config)
    assert set(names.values()) <= set(model.state_dict())


def test_blocks_load_from_checkpoint_names(model: torch.nn.Module, save_model) -> None:
    """make_block under meta + tensors named block_prefix(i) + param reproduces the model's blocks. The names are
    those save_pretrained writes (Mixtral: per-expert w1/w2/w3, not transformers 5's in-memory fused experts)."""
    family = get_family(model.config)
    state = load_file(save_model(model) / "model.safetensors")
    blocks = []
    for i in (2, 3, 4):
        with torch.device("meta"):
            block = family.make_block(model.config, i)
        prefix = family.block_prefix(i)
        block.load_state_dict({k: state[prefix + k] for k in block.state_dict()}, assign=True)
        blocks.append(block)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        maxdiff("meta-built span [2,5)", model, Span(model.config, blocks, 2)(x), Span.from_model(model, 2, 5)(x), 0.0)


@pytest.mark.parametrize("start,end", [(0, 6), (1, 4), (5, 6)])
def test_span_forward_matches_model(model: torch.nn.Module, start: int, end: int) -> None:
    x = ids(2, 10)
    ref = reference_block_outputs(model, x)
    span = Span.from_model(model, start, end)
    assert (span.start, span.end, span.hidden_size) == (start, end, model.config.hidden_size)
    with torch.no_grad():
        maxdiff(f"span [{start},{end}) forward", model, span(ref[start]), ref[end])


def test_chained_spans_equal_full_model(model: torch.nn.Module) -> None:
    parts, x = client_parts(model), ids(2, 10)
    with torch.no_grad():
        hidden = Span.from_model(model, 3, 6)(Span.from_model(model, 0, 3)(parts.embed(x)))
        maxdiff("[0,3)+[3,6) logits", model, parts.logits(hidden), model(x).logits)


def test_cached_steps_equal_full_forward(model: torch.nn.Module) -> None:
    parts, span, x = client_parts(model), Span.from_model(model, 0, 6), ids(2, 11)
    with torch.no_grad():
        embedded = parts.embed(x)
        full = span(embedded)
        cache = span.new_cache(2, 16, torch.float32, "cpu")
        outs = [span.step(embedded[:, :5], cache)]
        outs += [span.step(embedded[:, i : i + 1], cache) for i in range(5, 11)]
    assert cache.length == 11
    maxdiff("prefill 5 + 6 steps", model, torch.cat(outs, 1), full)


def test_a_prompt_without_past_or_padding_runs_unmasked_and_equals_the_masked_run(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoder families skip the explicit mask (sdpa's causal kernel) exactly when nothing needs masking."""
    from petal.kernels.families.decoder import BlockRunner

    span, x = Span.from_model(model, 0, 6), torch.randn(2, 12, model.config.hidden_size)
    if type(span._runner).prepare is not BlockRunner.prepare:
        pytest.skip("this family builds its own masks (soft-capped scores, ALiBi)")
    ones = torch.ones(2, 12, dtype=torch.long)
    assert span._runner.prepare(ones, 12, x.dtype).causal
    assert not span._runner.prepare(ones, 4, x.dtype).causal  # a past: the mask is needed
    assert not span._runner.prepare(
        torch.cat([torch.zeros(2, 1, dtype=torch.long), ones[:, 1:]], 1), 12, x.dtype
    ).causal
    assert not span._runner.prepare(ones[:, :1], 1, x.dtype).causal
    with torch.no_grad():
        fast = span(x)
        prepare = span._runner.prepare

        def masked(*args: object) -> object:
            prepared = prepare(*args)
            prepared.causal = False
            return prepared

        monkeypatch.setattr(span._runner, "prepare", masked)
        maxdiff("unmasked causal vs masked", model, fast, span(x))


def test_history_replay_after_truncate(model: torch.nn.Module) -> None:
    """A replacement server replays inputs: truncating and re-running gives the same outputs."""
    span, x = Span.from_model(model, 2, 5), torch.randn(1, 8, model.config.hidden_size)
    cache = span.new_cache(1, 8, torch.float32, "cpu")
    first = span.step(x, cache)
    cache.truncate(4)
    tail = span.step(x[:, 4:], cache)
    cache.reset()
    again = span.step(x, cache)
    # Replaying 4 of 8 tokens multiplies matrices of another height, which BLAS may sum in another order (oneDNN/MKL
    # on Intel CPUs do for 4 vs 8 rows; AMD's did not), and Mixtral's experts see other token counts too: close, not
    # bit for bit. The full replay after a reset has the same shapes as the first run: exact.
    maxdiff("replay after truncate", model, tail, first[:, 4:], ATOL)
    maxdiff("replay after reset", model, again, first, 0.0)


def test_max_length_is_enforced(model: torch.nn.Module) -> None:
    span = Span.from_model(model, 0, 2)
    cache = span.new_cache(1, 6, torch.float32, "cpu")
    span.step(torch.randn(1, 5, model.config.hidden_size), cache)
    with pytest.raises(PetalError, match="max_length 6") as err:
        span.step(torch.randn(1, 2, model.config.hidden_size), cache)
    assert err.value.code == "max_length"
    assert cache.length == 5  # a refused step leaves the cache as it was
    span.step(torch.randn(1, 1, model.config.hidden_size), cache)
    assert cache.length == 6


def test_left_padding_equals_unpadded_rows(model: torch.nn.Module) -> None:
    parts, span = client_parts(model), Span.from_model(model, 0, 6)
    long, short = ids(1, 8, seed=4), ids(1, 5, seed=5)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    steps = ids(2, 4, seed=6)
    with torch.no_grad():
        alone = [span(parts.embed(torch.cat([row, steps[i : i + 1]], 1))) for i, row in enumerate((long, short))]
        whole = span(
            parts.embed(torch.cat([padded, steps], 1)), torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
        )
        maxdiff("padded forward row 0", model, whole[0], alone[0][0])
        maxdiff("padded forward row 1", model, whole[1, 3:], alone[1][0])

        cache = span.new_cache(2, 12, torch.float32, "cpu")
        outs = [span.step(parts.embed(padded), cache, mask)]
        for i in range(4):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            outs.append(span.step(parts.embed(steps[:, i : i + 1]), cache, mask))
        stepped = torch.cat(outs, 1)
    maxdiff("padded steps row 0", model, stepped[0], alone[0][0])
    maxdiff("padded steps row 1", model, stepped[1, 3:], alone[1][0])


def test_backward_matches_model(model: torch.nn.Module) -> None:
    """Gradient w.r.t. the input embeddings through frozen spans equals the gradient through transformers."""
    parts, x = client_parts(model), ids(2, 7)
    weight = torch.randn(2, 7, VOCAB, generator=torch.Generator().manual_seed(7))
    for p in model.parameters():
        p.requires_grad_(False)
    embeds = model.get_input_embeddings()(x)
    ref_in = embeds.clone().requires_grad_(True)
    (model(inputs_embeds=ref_in).logits * weight).sum().backward()

    ours_in = embeds.clone().requires_grad_(True)
    hidden = ours_in
    if model.config.model_type == "bloom":  # BLOOM's embedding layernorm is part of ClientParts.embed
        hidden = parts.word_embeddings_layernorm(hidden)
    hidden = Span.from_model(model, 3, 6)(Span.from_model(model, 0, 3)(hidden))
    (parts.logits(hidden) * weight).sum().backward()
    assert ref_in.grad is not None and ref_in.grad.abs().max() > 0
    maxdiff("grad w.r.t. inputs_embeds", model, ours_in.grad, ref_in.grad)


def greedy(model: torch.nn.Module, prompt: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding the way a petal client does it: ClientParts + two chained spans, each with its own cache."""
    parts = client_parts(model)
    spans = [Span.from_model(model, 0, 2), Span.from_model(model, 2, 6)]
    caches = [s.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens, torch.float32, "cpu") for s in spans]
    tokens, inputs = [], prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            hidden = parts.embed(inputs)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span.step(hidden, cache, mask)
            inputs = parts.logits(hidden[:, -1:]).argmax(-1)
            tokens.append(inputs)
            mask = torch.cat([mask, torch.ones_like(inputs)], 1)
    return torch.cat(tokens, 1)


def test_greedy_generation_matches_generate(model: torch.nn.Module) -> None:
    prompt = ids(1, 6, seed=8)
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10)
    ours = greedy(model, prompt, torch.ones_like(prompt), 10)
    assert ours.tolist() == ref[:, 6:].tolist()


def test_padded_batch_generation_matches_generate(model: torch.nn.Module) -> None:
    prompt = torch.cat([ids(1, 6, seed=9), torch.cat([torch.zeros(1, 2, dtype=torch.long), ids(1, 4, seed=10)], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    ref = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert greedy(model, prompt, mask, 8).tolist() == ref[:, 6:].tolist()


def test_bf16_forward_and_steps_match_model(model: torch.nn.Module) -> None:
    """Servers run in half precision: bf16 stays within a couple of bf16 ulps (eps 7.8e-3) of transformers."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.name = model.name
    x = ids(2, 9)
    ref = reference_block_outputs(half, x)
    span = Span.from_model(half, 0, 4)
    with torch.no_grad():
        maxdiff("bf16 span [0,4) forward", half, span(ref[0]), ref[4], 2e-2)
        cache = span.new_cache(2, 9, torch.bfloat16, "cpu")
        outs = [span.step(ref[0][:, :4], cache)] + [span.step(ref[0][:, i : i + 1], cache) for i in range(4, 9)]
    maxdiff("bf16 prefill 4 + 5 steps", half, torch.cat(outs, 1), ref[4], 2e-2)
