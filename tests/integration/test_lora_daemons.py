"""Client-owned LoRA through real petald daemons: forward and backward equal local PEFT; bad LoRA gets clear errors.

Three daemons serve blocks [0, 10), [10, 20), [20, 30) of a tiny random 30-block Llama. The client half (libp2p
transport, DHT node, router) runs in the test process and calls `petal.daemon.routing.calls.forward/backward` with a
`Lora` made of the PEFT model's adapter weights (q_proj and v_proj of every block, random nonzero A and B).
Codec "none": tolerance TOL on max |diff| / max(1, max |ref|) for logits, input grads and LoRA grads.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peft
import pytest
import torch

from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.routing.calls import backward, forward
from petal.daemon.routing.router import Router
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora, encode_lora
from petal.protocol.messages import FORWARD_PROTOCOL, check_reply
from petal.protocol.tensors import encode_tensor
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
TOL = 1e-5
HIDDEN = 32
_PEFT_KEY = re.compile(r".*\.layers\.(\d+)\.(.+)\.lora_(A|B)\.default\.weight$")


def make_model() -> torch.nn.Module:
    return tiny_llama(num_hidden_layers=30, hidden_size=HIDDEN, intermediate_size=64)


def close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err <= tol, f"max rel |diff| {err:.2e} > {tol}"
    return err


@pytest.fixture(scope="module")
def swarm():
    root = Path(tempfile.mkdtemp(prefix="petal-l-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    make_model().save_pretrained(root / MODEL, safe_serialization=True)
    s = Swarm(root)
    serve = ("--serve", str(root / MODEL))
    try:
        first = s.start_bootstrap("s0", *serve, "--blocks", "0:10")
        with ThreadPoolExecutor(max_workers=2) as pool:  # startup is mostly waiting: start the others together
            rest = [pool.submit(s.join, f"s{i}", first, *serve, "--blocks", f"{10 * i}:{10 * i + 10}") for i in (1, 2)]
            for f in rest:
                f.result()
        yield s, first.status()["dht_port"]
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def router(swarm):
    _, dht_port = swarm
    identity = Identity.generate()
    transport = Libp2pTransport(identity)
    await transport.start()
    dht = DHT(identity, host="127.0.0.1", port=0)
    await dht.start([("127.0.0.1", dht_port)])
    r = Router(transport, dht, max_age=0.0, max_stale=0.0)
    yield r
    await r.close()
    await dht.stop()
    await transport.stop()


def peft_reference() -> tuple[torch.nn.Module, torch.nn.Module, Lora, dict[str, torch.nn.Parameter]]:
    plain = make_model()
    torch.manual_seed(11)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    pm = peft.get_peft_model(make_model(), config)
    weights, params = {}, {}
    for name, p in pm.named_parameters():
        m = _PEFT_KEY.fullmatch(name)
        if m:
            key = f"{m.group(1)}.{m.group(2)}.lora_{m.group(3)}"
            weights[key], params[key] = p.detach().clone(), p
    return plain, pm, Lora(8 / 4, weights), params


async def test_forward_backward_match_peft(router) -> None:
    plain, pm, lora, params = peft_reference()
    assert len(lora.weights) == 30 * 2 * 2
    torch.manual_seed(5)
    embeds = torch.randn(2, 6, HIDDEN)
    grad_logits = torch.randn(2, 6, plain.config.vocab_size)
    x_ref = embeds.clone().requires_grad_(True)
    ref = pm(inputs_embeds=x_ref).logits
    ref_grads = torch.autograd.grad(ref, [x_ref, *params.values()], grad_logits)

    def head(h: torch.Tensor) -> torch.Tensor:
        return plain.lm_head(plain.model.norm(h))

    out = await forward(router, MODEL, embeds, codec="none", lora=lora)
    print(f"logits: max rel |diff| {close(head(out), ref.detach()):.2e}")
    # the output gradient through the client's own head, then backward through the swarm
    out_leaf = out.clone().requires_grad_(True)
    (grad_out,) = torch.autograd.grad(head(out_leaf), out_leaf, grad_logits)
    grad_in, grad_prompts, grad_lora = await backward(router, MODEL, embeds, grad_out, codec="none", lora=lora)
    assert grad_prompts is None and grad_lora is not None
    print(f"input grad: max rel |diff| {close(grad_in, ref_grads[0]):.2e}")
    assert list(grad_lora) == list(lora.weights)
    worst = max(close(grad_lora[k], g) for k, g in zip(params, ref_grads[1:], strict=True))
    print(f"lora grads (120 tensors): worst max rel |diff| {worst:.2e}")

    # a sub-range crossing a server boundary, with only some blocks' weights
    sub = lora.for_blocks(8, 12)
    assert sub is not None
    h8 = await forward(router, MODEL, embeds, end=8, codec="none")
    g_in, _, g_lora = await backward(
        router, MODEL, h8, torch.ones(2, 6, HIDDEN), start=8, end=14, codec="none", lora=sub
    )
    assert g_lora is not None and set(g_lora) == set(sub.weights) and g_in.shape == h8.shape
    with pytest.raises(PetalError, match="outside the call's blocks") as e:
        await forward(router, MODEL, embeds, end=8, codec="none", lora=sub)
    assert e.value.code == "bad_request"


def _request(weights: dict) -> dict:
    hidden = torch.randn(1, 3, HIDDEN)
    return {
        "model": MODEL,
        "start": 0,
        "end": 10,
        "codec": "none",
        "hidden": encode_tensor(hidden),
        "lora": {"scale": 1.0, "weights": weights},
    }


async def test_bad_lora_gets_clear_errors_and_the_server_goes_on(router) -> None:
    view = await router.view(MODEL)
    server = next(s for s in view.servers.values() if s.start == 0)
    a, b = torch.zeros(2, HIDDEN), torch.zeros(HIDDEN, 2)
    huge = {"dtype": "float32", "shape": [1 << 15, 1 << 15], "codec": "none", "data": b""}  # 4 GiB declared
    cases = [
        (
            {"0.self_attn.q_proj.lora_A": huge, "0.self_attn.q_proj.lora_B": encode_tensor(b)},
            "too_large",
            "exceeds the limit",
        ),
        (
            encode_lora(Lora(1.0, {"3.self_attn.nope.lora_A": a, "3.self_attn.nope.lora_B": b}))["weights"],
            "bad_request",
            "no linear layer 'self_attn.nope'",
        ),
        (
            encode_lora(Lora(1.0, {"3.self_attn.k_proj.lora_A": a, "3.self_attn.k_proj.lora_B": b}))["weights"],
            "wrong_shape",
            "'3.self_attn.k_proj'",
        ),
        (
            encode_lora(Lora(1.0, {"12.self_attn.q_proj.lora_A": a, "12.self_attn.q_proj.lora_B": b}))["weights"],
            "bad_request",
            "outside this request's blocks",
        ),
        ({"0.self_attn.q_proj.lora_A": encode_tensor(a)}, "bad_request", "lora_B' is missing"),
        ({"0.q.lora_A": "garbage", "0.q.lora_B": encode_tensor(b)}, "bad_tensor", "'0.q.lora_A'"),
    ]
    for weights, code, match in cases:
        reply = await router.transport.call(server.peer, FORWARD_PROTOCOL, _request(weights), timeout=30)
        with pytest.raises(PetalError, match=match) as e:
            check_reply(reply, "hidden")
        assert e.value.code == code, e.value
    # the same server still serves, with and without a valid LoRA
    ok = encode_lora(Lora(1.0, {"3.self_attn.q_proj.lora_A": a, "3.self_attn.q_proj.lora_B": b}))["weights"]
    check_reply(await router.transport.call(server.peer, FORWARD_PROTOCOL, _request(ok), timeout=30), "hidden")
    out = await forward(router, MODEL, torch.randn(1, 3, HIDDEN), codec="none")
    assert out.shape == (1, 3, HIDDEN)
