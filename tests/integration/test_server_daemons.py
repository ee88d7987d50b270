"""Real petald processes on 127.0.0.1 serving blocks of a tiny random 30-block Llama; the test talks libp2p to them.

Same reference and tolerances as test_server.py (`tests.support.blocks`): blocks [a, b) map transformers'
`hidden_states[a]` to `hidden_states[b]`; codec "none" within ATOL (relative), "q8" within Q8_TOL.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import PeerAddr
from petal.daemon.routing.remote import RemoteSpan
from petal.kernels.store import open_model
from petal.protocol.errors import PetalError
from petal.protocol.records import block_key
from tests.support.blocks import ATOL, HIDDEN, Q8_TOL, close, hidden_states, tiny_llama
from tests.support.daemons import Swarm


@pytest.fixture(scope="module")
def served():
    """Two daemons: the bootstrap serves blocks [0, 10), a second one [10, 20) with a small KV budget."""
    root = Path(tempfile.mkdtemp(prefix="petal-srv-", dir="/tmp"))  # short: AF_UNIX paths are limited
    model_dir = root / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    swarm = Swarm(root)
    try:
        boot = swarm.start_bootstrap("s0", "--serve", str(model_dir), "--blocks", "0:10", "--max-length", "64")
        second = swarm.join(
            "s1",
            boot,
            "--serve",
            str(model_dir),
            "--blocks",
            "10:20",
            "--max-cache-tokens",
            "160",
            "--alloc-timeout",
            "0.5",
            "--max-length",
            "64",
        )
        yield model_dir, boot, second
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def client(served):
    transport = Libp2pTransport(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"])
    await transport.start()
    yield transport
    await transport.stop()


def remote(transport, daemon, model_dir: Path, start: int, end: int, codec: str = "none") -> RemoteSpan:
    status = daemon.status()
    info = open_model(model_dir)
    return RemoteSpan(
        transport, PeerAddr(status["peer_id"], tuple(status["addrs"])), info.name, info.fingerprint, start, end, codec
    )


async def test_real_daemons_match_transformers(served, client) -> None:
    model_dir, boot, second = served
    ref = LlamaForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(5)
    embeds = torch.randn(2, 6, HIDDEN)
    hs = hidden_states(ref, embeds)
    first, nxt = remote(client, boot, model_dir, 0, 10), remote(client, second, model_dir, 10, 20)

    info = await nxt.info()
    assert (info.start, info.end, info.cache_tokens_left) == (10, 20, 16) and info.throughput > 0
    announced = boot.status()["announced"]
    assert block_key(info.model, 0) in announced and block_key(info.model, 9) in announced
    throughput_cache = json.loads((boot.state_dir / "throughput.json").read_text())
    assert len(throughput_cache) == 1 and next(iter(throughput_cache.values())) > 0

    # a chain of two servers
    out = await nxt.forward(await first.forward(embeds))
    assert close(out, hs[20])
    q8 = remote(client, second, model_dir, 10, 20, "q8")
    assert close(await q8.forward(await remote(client, boot, model_dir, 0, 10, "q8").forward(embeds)), hs[20], Q8_TOL)

    # backward through the chain against autograd from the embeddings
    grad_out = torch.randn(2, 6, HIDDEN)
    e = embeds.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(hidden_states(ref, e)[20], e, grad_out)
    g10, _, _ = await nxt.backward(hs[10], grad_out)
    g0, _, _ = await first.backward(embeds, g10)
    assert close(g0, expected)

    # inference, step by step through both servers
    async with await first.open_inference(16, 2) as a, await nxt.open_inference(8, 2) as b:
        outs = [await b.step(await a.step(embeds[:, :3]))]
        for i in range(3, 6):
            outs.append(await b.step(await a.step(embeds[:, i : i + 1])))
    assert close(torch.cat(outs, dim=1), hs[20])


async def test_real_daemon_errors_and_busy(served, client) -> None:
    model_dir, _, second = served
    nxt = remote(client, second, model_dir, 10, 20)
    good = await nxt.open_inference(8, 1)  # 10 blocks x 8 tokens = 80 of the 160 token-blocks
    h = torch.randn(1, 2, HIDDEN)
    await good.step(h)

    with pytest.raises(PetalError) as err:
        await nxt.open_inference(8, 2)  # 160 more: not free within alloc_timeout
    assert err.value.code == "busy"
    with pytest.raises(PetalError) as err:
        await remote(client, second, model_dir, 0, 10).forward(h)
    assert err.value.code == "unknown_block"
    with pytest.raises(PetalError) as err:
        await nxt.forward(torch.randn(1, 2, HIDDEN + 2))
    assert err.value.code == "wrong_shape"
    with pytest.raises(PetalError) as err:
        await good.step(torch.randn(1, 7, HIDDEN))  # 2 cached + 7 > 8
    assert err.value.code == "max_length"

    # the session goes on after the errors, and equals a fresh forward over the same tokens
    last = await good.step(torch.ones(1, 1, HIDDEN))
    full = await nxt.forward(torch.cat([h, torch.ones(1, 1, HIDDEN)], dim=1))
    assert close(last, full[:, 2:], ATOL)
    await good.close()
    await asyncio.sleep(0.2)
    assert (await nxt.info()).cache_tokens_left == 16  # freed on close
