"""Mistral, Qwen2, Qwen3, Gemma 2, Mixtral and Falcon over real petald daemons equal transformers: forward, backward,
session steps and greedy generation through a daemon's socket.

Per family, two daemons serve a tiny random 6-block model ([0,3) and [3,6), `--codec none`) with petal's own block
code (kernels/families/decoder.py; Mixtral: mixtral.py; Falcon, the 40B layout: falcon.py; Gemma 2: gemma2.py, its
greedy check skips the final soft-cap, which keeps the argmax); the test asks the first daemon's socket, as a client
program would. Sliding windows (4 tokens) are shorter than the sequences, so they matter. Llama has the same coverage
in test_smollm2_e2e.py and test_session_daemons.py, BLOOM in test_bloom_daemons.py.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from petal.ctl.client import Client
from tests.support.daemons import Swarm, wait_for_route
from tests.support.tinymodels import (
    TINY_VOCAB,
    tiny_falcon,
    tiny_gemma2,
    tiny_mistral,
    tiny_mixtral,
    tiny_qwen2,
    tiny_qwen3,
)

BLOCKS = 6
ATOL = 1e-5  # fp32 on both sides, codec none: only the op order differs
BUILDERS = {
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "gemma2": tiny_gemma2,
    "mixtral": tiny_mixtral,
    "falcon": tiny_falcon,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def served(request: pytest.FixtureRequest):
    """(model name, transformers model, the first daemon's Client) for a two-daemon swarm of one family."""
    root = Path(tempfile.mkdtemp(prefix="petal-f-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    name = f"tiny-{request.param}"
    model = BUILDERS[request.param]()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root / name, safe_serialization=True)
    swarm = Swarm(root / "d")
    serve = ("--serve", str(root / name), "--codec", "none")
    try:
        first = swarm.start_bootstrap("a", *serve, "--blocks", "0:3")
        swarm.join("b", first, *serve, "--blocks", "3:6")
        chain = wait_for_route(first, name, BLOCKS)
        assert [(h["start"], h["end"]) for h in chain] == [(0, 3), (3, 6)]
        yield name, model, first.client
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


def blocks_out(model: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """What leaves the last block (before the final norm) in a transformers forward; differentiable."""
    seen: list[torch.Tensor] = []
    inner = getattr(model, model.base_model_prefix)  # `.model`, or Falcon's `.transformer` (its blocks: `.h`)
    hook = (inner.layers if hasattr(inner, "layers") else inner.h)[-1].register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        model(inputs_embeds=embeds)
    finally:
        hook.remove()
    return seen[0]


def close(what: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff, scale = (ours - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    print(f"\n{what}: max |diff| {diff:.3e} (max |ref| {scale:.2f})")
    assert diff <= ATOL * scale, f"{what}: max |diff| {diff} > {ATOL} x {scale}"


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_backward_and_steps_equal_transformers(served) -> None:
    name, model, c = served
    c: Client
    embeds = model.get_input_embeddings()(ids(2, 10, seed=1)).detach()
    with torch.no_grad():
        ref = blocks_out(model, embeds)
    close(f"{name} forward", c.forward(name, embeds, codec="none"), ref)

    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref_in = embeds.clone().requires_grad_(True)
    (blocks_out(model, ref_in) * g).sum().backward()
    assert ref_in.grad is not None and ref_in.grad.abs().max() > 0
    close(f"{name} backward", c.backward(name, embeds, g, codec="none")[0], ref_in.grad)

    with c.open_session(name, max_length=10, batch=2, codec="none") as s:
        outs = [s.step(embeds[:, :4])] + [s.step(embeds[:, t : t + 1]) for t in range(4, 10)]
    close(f"{name} session steps", torch.cat(outs, 1), ref)


def test_greedy_generation_equals_transformers_generate(served) -> None:
    name, model, c = served
    c: Client
    prompt, new = ids(1, 5, seed=3), 12
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new)
    tokens: list[int] = []
    with torch.no_grad(), c.open_session(name, max_length=5 + new, codec="none") as s:
        inputs = prompt
        for _ in range(new):
            hidden = s.step(model.get_input_embeddings()(inputs))
            inner = getattr(model, model.base_model_prefix)
            norm = inner.norm if hasattr(inner, "norm") else inner.ln_f  # Falcon: ln_f
            nxt = int(model.lm_head(norm(hidden[:, -1])).argmax(-1))
            tokens.append(nxt)
            inputs = torch.tensor([[nxt]])
    assert tokens == want[0, 5:].tolist()
    assert len(set(tokens)) > 1, "a constant sequence would prove little"
