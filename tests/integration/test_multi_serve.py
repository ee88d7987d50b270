"""One petald serving several spans: two spans of one model (which chain, through the daemon itself), a second model
of another shape, and a server-hosted LoRA adapter (`--adapter`), against transformers and PEFT.

One daemon: ``--serve a:0:3 --serve a:3:6 --serve b --adapter ad=DIR``; the adapter fits only model a, so it is hosted
on a's spans alone. The client half (libp2p, DHT node, router) runs in the test process.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import peft
import pytest
import torch

from petal.ctl.client import DaemonError
from petal.daemon.routing.calls import backward, forward
from petal.daemon.routing.session import InferenceSession
from petal.protocol.errors import PetalError
from tests.support.daemons import Swarm
from tests.support.swarms import Client
from tests.support.tinymodels import TINY_VOCAB, tiny_llama
from tests.support.torchref import assert_close, last_block_output

ATOL = 1e-5  # fp32 both sides, codec none


def reference_out(model: torch.nn.Module, embeds: torch.Tensor, layers: torch.nn.ModuleList) -> torch.Tensor:
    return last_block_output(model, embeds, layers)


def close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert_close(name, ours, ref, ATOL)


@pytest.fixture(scope="module")
def models():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    a, b = tiny_llama(seed=0), tiny_llama(seed=1, hidden_size=32, intermediate_size=64)
    a.save_pretrained(root / "a", safe_serialization=True)
    b.save_pretrained(root / "b", safe_serialization=True)
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    adapted = peft.get_peft_model(tiny_llama(seed=0), config).eval()
    adapted.save_pretrained(root / "ad")  # PEFT's own format: adapter_config.json + adapter_model.safetensors
    yield root, a, b, adapted
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(models):
    root, *_ = models
    sockets = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(sockets)
    try:
        yield s.start_bootstrap(
            "d0",
            *("--serve", f"{root / 'a'}:0:3", "--serve", f"{root / 'a'}:3:6", "--serve", str(root / "b")),
            *("--adapter", f"ad={root / 'ad'}", "--codec", "none", "--spot-check-rate", "0"),
        )
    finally:
        s.close()
        shutil.rmtree(sockets, ignore_errors=True)


@pytest.fixture
async def client(daemon):
    c = await Client().start(daemon.status()["dht_port"])
    try:
        deadline = time.monotonic() + 60
        while True:
            spans = sorted((s.start, s.end) for s in (await c.router.view("a", fresh=True)).servers.values())
            if spans == [(0, 3), (3, 6)]:
                break
            assert time.monotonic() < deadline, f"model a's two spans never showed up: {spans}"
            await asyncio.sleep(0.5)
        yield c
    finally:
        await c.stop()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


async def test_one_daemon_serves_two_models_and_two_spans_chain(client, models, daemon) -> None:
    _, a, b, _ = models
    status = daemon.status()["serving"]
    assert sorted((s["model"], s["start"], s["end"]) for s in status) == [("a", 0, 3), ("a", 3, 6), ("b", 0, 6)]
    view = await client.router.view("a")
    assert {s.peer_id for s in view.servers.values()} == {daemon.status()["peer_id"]}  # one peer, two servers
    assert all(s.adapters == ("ad",) for s in view.servers.values())
    assert (await client.router.view("b")).servers[daemon.status()["peer_id"]].adapters == ()  # did not fit b
    models_listed = {m["id"] for m in daemon.client.get("/v1/models")["data"] if m.get("servers")}
    assert {"a", "b"} <= models_listed
    dash = {m["model"]: m for m in daemon.client.get("/v1/dashboard")["models"]}  # the page and `petalctl swarm`
    assert sorted((s["start"], s["end"], s["adapters"]) for s in dash["a"]["servers"]) == [
        (0, 3, ["ad"]),
        (3, 6, ["ad"]),
    ]
    assert [s["adapters"] for s in dash["b"]["servers"]] == [[]]

    x = ids(2, 7, seed=1)
    for name, model in (("a", a), ("b", b)):
        embeds = model.model.embed_tokens(x).detach()
        with torch.no_grad():
            ref = reference_out(model, embeds, model.model.layers)
            out = await forward(client.router, name, embeds, codec="none")
        close(f"forward of {name}", out, ref)

    # an inference session over a's two spans on the same daemon: the first pushes to the second in-process
    embeds = a.model.embed_tokens(x[:1]).detach()
    with torch.no_grad():
        ref = reference_out(a, embeds, a.model.layers)
    async with InferenceSession(client.router, "a", max_length=16, codec="none") as session:
        assert [(h.start, h.end) for h in session.chain] == [(0, 3), (3, 6)]
        steps = [await session.step(embeds[:, :4])] + [await session.step(embeds[:, i : i + 1]) for i in range(4, 7)]
    close("cached steps through both spans", torch.cat(steps, dim=1), ref)


async def test_server_hosted_adapter_equals_peft(client, models) -> None:
    _, a, _, adapted = models
    x = ids(2, 7, seed=3)
    embeds = a.model.embed_tokens(x).detach()
    layers = adapted.base_model.model.model.layers
    with torch.no_grad():
        ref = reference_out(adapted, embeds, layers)
        base = reference_out(a, embeds, a.model.layers)
        out = await forward(client.router, "a", embeds, codec="none", adapter="ad")
        plain = await forward(client.router, "a", embeds, codec="none")  # the same servers, without it
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the output
    close("forward with adapter ad", out, ref)
    close("forward without it", plain, base)

    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    ref_in = embeds.clone().requires_grad_(True)
    (reference_out(adapted, ref_in, layers) * g).sum().backward()
    grad, _, _ = await backward(client.router, "a", embeds, g, codec="none", adapter="ad")
    close("backward with adapter ad", grad, ref_in.grad)

    async with InferenceSession(client.router, "a", max_length=16, codec="none", adapter="ad") as session:
        steps = [await session.step(embeds[:1, :5])] + [await session.step(embeds[:1, i : i + 1]) for i in (5, 6)]
    close("cached steps with adapter ad", torch.cat(steps, dim=1), ref[:1])

    with pytest.raises(PetalError, match="hosts adapter 'nope'"):
        await forward(client.router, "a", embeds, codec="none", adapter="nope")
    with pytest.raises(PetalError, match="hosts adapter 'ad'"):  # b's server does not host it
        await forward(client.router, "b", torch.randn(1, 2, 32), codec="none", adapter="ad")


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``prompt`` (n tokens, no cache), as plain argmax steps."""
    out = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prompt) :]


def test_generate_with_a_server_hosted_adapter(daemon, models) -> None:
    """/v1/generate names the adapter by its field or as MODEL:ADAPTER; greedy tokens equal PEFT's."""
    root, a, _, adapted = models
    prompt = ids(1, 5, seed=5)[0].tolist()
    for body in ({"model": str(root / "a"), "adapter": "ad"}, {"model": f"{root / 'a'}:ad"}):
        lines = list(daemon.client.generate(body.pop("model"), input_ids=prompt, max_new_tokens=6, **body))
        tokens = lines[-1]["tokens"]
        want = greedy(adapted, prompt, 6)
        assert tokens == want[: len(tokens)] and tokens, (tokens, want)
    plain = list(daemon.client.generate(str(root / "a"), input_ids=prompt, max_new_tokens=6))[-1]["tokens"]
    assert plain == greedy(a, prompt, 6)[: len(plain)]
    assert plain != tokens  # the adapter changes what is generated


def test_unserve_one_span_of_several(daemon) -> None:
    """Last in this module: it changes what the daemon serves."""
    c = daemon.client
    with pytest.raises(DaemonError, match="several spans of a"):
        c.unserve("a")
    assert c.unserve("a", "3:6")["stopped"] == [{"start": 3, "end": 6}]
    serving = sorted((s["model"], s["start"], s["end"]) for s in daemon.status()["serving"])
    assert serving == [("a", 0, 3), ("b", 0, 6)]
    assert c.unserve("b")["stopped"] == [{"start": 0, "end": 6}]


def test_serve_at_runtime_with_an_adapter(daemon, models) -> None:
    """After the test above: `/v1/serve` with ``adapters`` hosts a PEFT dir on the span it loads (as `--adapter` does
    at start); the server lists it and generation with it equals PEFT's. A bad entry is refused before loading."""
    root, _, _, adapted = models
    c = daemon.client
    with pytest.raises(DaemonError, match="adapter name"):
        list(c.serve(str(root / "a"), blocks="3:6", adapters=["bad name=/x"]))
    assert c.unserve("a")["stopped"] == [{"start": 0, "end": 3}]
    events = list(c.serve(str(root / "a"), adapters=[f"ad2={root / 'ad'}"]))
    assert events[0]["adapters"] == ["ad2"] and events[-1]["event"] == "serving", events
    assert events[-1]["adapters"] == ["ad2"]
    prompt = ids(1, 5, seed=6)[0].tolist()
    deadline = time.monotonic() + 60
    while True:  # the new span's record reaches the router's view
        try:
            lines = list(c.generate(f"{root / 'a'}:ad2", input_ids=prompt, max_new_tokens=6))
            break
        except DaemonError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    tokens = lines[-1]["tokens"]
    assert tokens and tokens == greedy(adapted, prompt, 6)[: len(tokens)], tokens
