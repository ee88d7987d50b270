"""BLOOM (ALiBi, embedding layernorm) over real petald daemons equals transformers: forward, backward, cached steps
and greedy generation.

Three daemons serve a tiny random 30-block BLOOM ([0,10) [10,20) [20,30)) with `--codec none`; the client half
(libp2p transport, DHT node, router, sessions) runs in the test process, as in tests/test_session_daemons.py.
Llama has the same coverage elsewhere; this proves the family-specific parts survive the wire.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.routing.calls import backward, forward
from petal.daemon.routing.router import Router
from petal.daemon.routing.session import InferenceSession
from tests.support.daemons import Swarm, wait_for_route
from tests.support.tinymodels import TINY_VOCAB, tiny_bloom
from tests.support.torchref import assert_close, last_block_output

MODEL = "tiny-bloom"
BLOCKS = 30
ATOL = 1e-5  # fp32 on both sides, codec none: only the op order differs


@pytest.fixture(scope="module")
def model_dir():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    model = tiny_bloom(n_layer=BLOCKS, hidden_size=32, n_head=4)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root / MODEL, safe_serialization=True)
    yield root / MODEL, model
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def swarm(model_dir):
    path, _ = model_dir
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    serve = ("--serve", str(path), "--codec", "none")
    try:
        first = s.start_bootstrap("b0", *serve, "--blocks", "0:10")
        with ThreadPoolExecutor(max_workers=2) as pool:  # startup is mostly waiting: overlap it
            for f in [
                pool.submit(s.join, f"b{i}", first, *serve, "--blocks", blocks)
                for i, blocks in ((1, "10:20"), (2, "20:30"))
            ]:
                f.result()
        yield first
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def router(swarm):
    """The client half of a daemon in the test process, joined to the swarm; waits until the route covers 30 blocks."""
    identity = Identity.generate()
    transport = Libp2pTransport(identity)
    await transport.start()
    dht = DHT(identity, host="127.0.0.1", port=0)
    await dht.start([("127.0.0.1", swarm.status()["dht_port"])])
    r = Router(transport, dht, max_age=0.0, max_stale=0.0, codec="none")
    try:
        deadline = time.monotonic() + 60
        while True:
            view = await r.view(MODEL, fresh=True)
            covered = sorted((s.start, s.end) for s in view.servers.values())
            if covered == [(0, 10), (10, 20), (20, 30)]:
                break
            assert time.monotonic() < deadline, f"the swarm view never showed all three servers: {covered}"
            await asyncio.sleep(0.5)
        yield r
    finally:
        await r.close()
        await dht.stop()
        await transport.stop()


def reference_out(model, embeds: torch.Tensor) -> torch.Tensor:
    """What leaves the last block (before ln_f), captured by a hook on a full transformers forward."""
    return last_block_output(model, embeds, model.transformer.h)


def close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert_close(name, ours, ref, ATOL)


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


async def test_forward_and_backward_equal_transformers(router, model_dir):
    _, model = model_dir
    x = ids(2, 9, seed=1)
    embeds = model.transformer.word_embeddings(x).detach()
    with torch.no_grad():
        h0 = model.transformer.word_embeddings_layernorm(embeds)  # BLOOM: the client applies this before block 0
        ref = reference_out(model, embeds)
        out = await forward(router, MODEL, h0, codec="none")
    close("forward", out, ref)

    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref_in = embeds.clone().requires_grad_(True)
    (reference_out(model, ref_in) * g).sum().backward()
    result = await backward(router, MODEL, h0, g, codec="none")
    grad_h0 = result[0]  # (grad, grad_prompts[, grad_lora])
    ours_in = embeds.clone().requires_grad_(True)
    model.transformer.word_embeddings_layernorm(ours_in).backward(grad_h0)  # back through the client's layernorm
    assert ref_in.grad is not None and ref_in.grad.abs().max() > 0
    close("grad w.r.t. embeddings", ours_in.grad, ref_in.grad)


async def test_cached_steps_equal_full_forward(router, model_dir):
    _, model = model_dir
    x = ids(1, 12, seed=3)
    with torch.no_grad():
        embeds = model.transformer.word_embeddings(x)
        ref = reference_out(model, embeds)
        h0 = model.transformer.word_embeddings_layernorm(embeds)
        outs = []
        async with InferenceSession(router, MODEL, max_length=12, codec="none") as s:
            outs.append(await s.step(h0[:, :5]))  # a 5-token prefill, then one token at a time
            for t in range(5, 12):
                outs.append(await s.step(h0[:, t : t + 1]))
            assert s.position == 12
            assert [(h.start, h.end) for h in s.chain] == [(0, 10), (10, 20), (20, 30)]
    close("cached steps", torch.cat(outs, 1), ref)


async def test_greedy_generation_equals_transformers_generate(router, model_dir):
    _, model = model_dir
    prompt, new = ids(1, 6, seed=4), 16
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new)
    tokens: list[int] = []
    t = model.transformer
    with torch.no_grad():
        async with InferenceSession(router, MODEL, max_length=6 + new, codec="none") as s:
            inputs = prompt
            for _ in range(new):
                hidden = await s.step(t.word_embeddings_layernorm(t.word_embeddings(inputs)))
                nxt = int(model.lm_head(t.ln_f(hidden[:, -1])).argmax(-1))
                tokens.append(nxt)
                inputs = torch.tensor([[nxt]])
    assert tokens == want[0, 6:].tolist()
    assert len(set(tokens)) > 1, "a constant sequence would prove little"


def test_through_a_fourth_daemons_socket(swarm, model_dir):
    """The issue's shape exactly: a 4th daemon with no blocks; its socket's forward and session equal transformers."""
    from petal.ctl.client import Client

    _, model = model_dir
    helper = Swarm(swarm.state_dir.parent)  # beside the three servers; stopped below by its PID
    client = helper.join("c", swarm, "--codec", "none")
    try:
        c: Client = client.client
        chain = wait_for_route(client, MODEL, BLOCKS)  # the client daemon's view fills as the DHT answers
        assert [(h["start"], h["end"]) for h in chain] == [(0, 10), (10, 20), (20, 30)]
        x = ids(1, 10, seed=5)
        with torch.no_grad():
            embeds = model.transformer.word_embeddings(x)
            ref = reference_out(model, embeds)
            h0 = model.transformer.word_embeddings_layernorm(embeds)
        close("forward via the socket", c.forward(MODEL, h0, codec="none"), ref)
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6))
        ref_in = h0.clone().requires_grad_(True)
        (_blocks_out(model, ref_in) * g).sum().backward()
        close("backward via the socket", c.backward(MODEL, h0, g, codec="none")[0], ref_in.grad)
        with c.open_session(MODEL, max_length=10, codec="none") as s:
            outs = [s.step(h0[:, :4])] + [s.step(h0[:, t : t + 1]) for t in range(4, 10)]
        close("session steps via the socket", torch.cat(outs, 1), ref)
    finally:
        helper.close()


def _blocks_out(model, h0: torch.Tensor) -> torch.Tensor:
    """The 30 blocks alone on ``h0`` (after the embedding layernorm), as transformers runs them."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(h0.shape[:2], dtype=torch.long)
    alibi = build_alibi_tensor(mask, model.config.n_head, h0.dtype)
    causal = torch.full((h0.shape[1], h0.shape[1]), torch.finfo(h0.dtype).min).triu(1)[None, None]
    h = h0
    for block in model.transformer.h:
        out = block(h, alibi=alibi, attention_mask=causal)
        h = out[0] if isinstance(out, tuple) else out
    return h
