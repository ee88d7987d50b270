"""Forward+backward without recomputation through real petald daemons: a forward with ``keep`` leaves each server's
activations for the backward, which then runs no forward at all, with the gradients of one that recomputes.

One swarm for the module: three servers host blocks [0,10), [10,20), [20,30) of a tiny random 30-block Llama; the
test talks to a fourth daemon (serving nothing) with codec "none". Each server counts the span forwards it ran
(`forward_runs` in its /v1/status) and the backwards that reused a kept forward (`activations_reused`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from petal.ctl.remote_model import RemoteModelForCausalLM
from petal.protocol.lora import Lora
from tests.support.daemons import Daemon, Swarm
from tests.support.tinymodels import tiny_llama
from tests.support.torchref import start_swarm

MODEL = "tiny-llama"
HIDDEN = 32


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    scale = max(float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= rel * scale


@pytest.fixture(scope="module")
def env():
    root = Path(tempfile.mkdtemp(prefix="petal-ar-", dir="/tmp"))  # short: AF_UNIX paths are limited
    tiny_llama(num_hidden_layers=30, hidden_size=HIDDEN, intermediate_size=64).save_pretrained(
        root / MODEL, safe_serialization=True
    )
    swarm = Swarm(root)
    try:
        client = start_swarm(swarm, root / MODEL)
        # in chain order: start_swarm starts s1 and s2 in parallel, so swarm.daemons holds them in either order
        servers = sorted((d for d in swarm.daemons if d is not client), key=lambda d: d.status()["serving"][0]["start"])
        yield root / MODEL, client, servers
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


def counters(servers: list[Daemon]) -> list[tuple[int, int, int]]:
    """(forward_runs, activations_reused, backward_recomputed) of each server."""
    out = []
    for d in servers:
        (span,) = d.status()["serving"]
        out.append((span["forward_runs"], span["activations_reused"], span["backward_recomputed"]))
    return out


def delta(before: list[tuple[int, ...]], after: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return [tuple(a - b for a, b in zip(y, x, strict=True)) for x, y in zip(before, after, strict=True)]


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Lora]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, HIDDEN, generator=g)
    grad = torch.randn(2, 6, HIDDEN, generator=g)
    prompts = torch.randn(30, 2, 3, HIDDEN, generator=g) * 0.1
    lora = Lora(
        2.0,
        {
            "12.self_attn.q_proj.lora_A": torch.randn(4, HIDDEN, generator=g) * 0.1,
            "12.self_attn.q_proj.lora_B": torch.randn(HIDDEN, 4, generator=g) * 0.1,
        },
    )
    return x, grad, prompts, lora


def test_kept_forward_runs_each_hop_once_with_the_same_grads(env):
    _, client, servers = env
    c = client.client
    x, grad, prompts, lora = inputs(0)
    before = counters(servers)
    expected = c.backward(MODEL, x, grad, prompts=prompts, lora=lora, codec="none")  # stateless: recomputes
    after = counters(servers)
    assert [d[0] for d in delta(before, after)] == [2, 2, 1]  # the daemon's re-run forward, then each server's
    out, fid = c.forward_keep(MODEL, x, prompts=prompts, lora=lora, codec="none")
    assert fid is not None
    assert close(out, c.forward(MODEL, x, prompts=prompts, lora=lora, codec="none"))
    before = counters(servers)
    got = c.backward(MODEL, x, grad, prompts=prompts, lora=lora, codec="none", forward_id=fid)
    assert delta(before, counters(servers)) == [(0, 1, 0)] * 3  # no forward ran again: each hop reused its graph
    assert close(got[0], expected[0]) and close(got[1], expected[1])
    assert got[2] is not None and expected[2] is not None
    for key in lora.weights:
        assert close(got[2][key], expected[2][key])


def test_a_forward_id_used_up_unknown_or_of_another_call_falls_back(env):
    _, client, servers = env
    c = client.client
    x, grad, prompts, _ = inputs(1)
    expected, expected_prompts, _ = c.backward(MODEL, x, grad, prompts=prompts, codec="none")
    _, fid = c.forward_keep(MODEL, x, prompts=prompts, codec="none")
    assert fid is not None
    other = x + 1.0  # another input: the kept forward is not this call's
    _, fid2 = c.forward_keep(MODEL, other, prompts=prompts, codec="none")
    cases = [(fid, [0, 0, 0]), (fid, [2, 2, 1]), ("no-such-forward", [2, 2, 1]), (fid2, [2, 2, 1])]
    for forward_id, runs in cases:  # reused; used up; unknown (or expired); another input's: recomputed
        before = counters(servers)
        g, gp, _ = c.backward(MODEL, x, grad, prompts=prompts, codec="none", forward_id=forward_id)
        assert close(g, expected) and gp is not None and close(gp, expected_prompts)
        assert [d[0] for d in delta(before, counters(servers))] == runs


def test_torch_client_asks_to_keep_only_when_a_backward_can_follow(env):
    path, client, servers = env
    model = RemoteModelForCausalLM.from_pretrained(path, client.socket, codec="none", tuning_mode="deep_ptune")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    before = counters(servers)
    with torch.no_grad():
        model(ids)
    mid = counters(servers)
    assert [d[0] for d in delta(before, mid)] == [1, 1, 1]
    out = model(ids, labels=ids)
    assert out.loss is not None
    out.loss.backward()
    assert delta(mid, counters(servers)) == [(1, 1, 0)] * 3  # one forward and one reused backward per hop
    assert model.prompts is not None and any(p.grad is not None for p in model.prompts.parameters())
