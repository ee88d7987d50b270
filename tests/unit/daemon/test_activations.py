"""Activation reuse: the server's `ActivationStore` keeps within its budget, per-peer share and TTL; a backward that
names a kept forward runs no forward again and gives the same gradients as one that recomputes; a kept forward that
is gone, another peer's or another call's is recomputed.

Server cases run a real `BlockServer` over MemoryTransport (the `swarm` fixture of test_server.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import torch

from petal.daemon.net.transport import MemoryTransport, PeerAddr
from petal.daemon.routing.calls import backward, forward_kept
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.serving.activations import ActivationStore, Kept
from tests.support.blocks import HIDDEN, close
from tests.support.swarms import MODEL, LocalSwarm, N, embed
from tests.support.tinymodels import tiny_llama
from tests.unit.daemon.test_server import model_dir, swarm  # noqa: F401  # fixtures

MB = 2**20


@contextlib.asynccontextmanager
async def local_swarm(*spans: tuple[int, int]) -> AsyncIterator[tuple[LocalSwarm, torch.nn.Module]]:
    """In-process servers of a tiny Llama, one per span, and the model they serve."""
    model = tiny_llama(num_hidden_layers=N)
    local = LocalSwarm(model)
    await local.start()
    try:
        for a, b in spans:
            await local.add(a, b)
        yield local, model
    finally:
        await local.close()


def kept(nbytes: int) -> Kept:
    return Kept(0, 1, torch.zeros(1), [torch.zeros(1)], {}, nbytes)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_keeps_within_budget_share_and_ttl() -> None:
    clock = Clock()
    store = ActivationStore(10 * MB, peer_share=0.5, ttl=60.0, clock=clock)
    assert store.put("a", kept(6 * MB)) is None and store.refused == 1  # over a peer's share: not kept
    a1 = store.put("a", kept(3 * MB))
    a2 = store.put("a", kept(2 * MB))  # a holds 5 MB: its share
    assert a1 and a2 and store.held("a") == 5 * MB
    a3 = store.put("a", kept(1 * MB))  # a's own oldest goes, not another peer's
    assert a3 and store.take("a", a1) is None and store.held("a") == 3 * MB
    b1 = store.put("b", kept(4 * MB))
    c1 = store.put("c", kept(4 * MB))  # over the budget: the least recently kept (a2) goes, whoever's it is
    assert b1 and c1 and store.take("a", a2) is None and store.nbytes == 9 * MB
    b2 = store.put("b", kept(2 * MB))  # over b's share: b's own oldest (b1) goes
    assert b2 and store.take("b", b1) is None and store.held("b") == 2 * MB and store.nbytes == 7 * MB
    assert store.take("b", a3) is None and store.take("a", a3) is not None  # bound to its peer
    assert store.take("a", a3) is None  # one backward per graph
    clock.now = 61.0
    assert store.sweep() == 2 and store.nbytes == 0 and len(store) == 0  # c1, b2 expired


async def test_backward_reuses_the_kept_forward(swarm) -> None:  # noqa: F811
    server, remote, _ = swarm
    torch.manual_seed(3)
    x = torch.randn(2, 5, HIDDEN)
    prompts = torch.randn(4, 2, 3, HIDDEN)  # deep prompts for blocks [2, 6)
    grad_out = torch.randn(2, 5, HIDDEN)
    span: RemoteSpan = remote(2, 6)
    runs = server.compute.forwards
    expected = await span.backward(x, grad_out, prompts=prompts)  # recomputes: one span forward
    assert server.compute.forwards == runs + 1
    out, activation = await span.forward_keep(x, prompts=prompts)
    assert activation is not None and server.activations.nbytes > 0
    assert close(out, await span.forward(x, prompts=prompts))
    runs = server.compute.forwards
    got = await span.backward(x, grad_out, prompts=prompts, activation=activation)
    assert server.compute.forwards == runs and server.activations.reused == 1  # no forward ran again
    assert server.activations.nbytes == 0  # released by the backward
    for g, e in zip(got[:2], expected[:2], strict=True):
        assert g is not None and e is not None and close(g, e)


async def test_a_gone_or_foreign_activation_is_recomputed(swarm) -> None:  # noqa: F811
    server, remote, client_t = swarm
    torch.manual_seed(4)
    x, grad_out = torch.randn(1, 4, HIDDEN), torch.randn(1, 4, HIDDEN)
    span: RemoteSpan = remote(0, 3)
    expected, _, _ = await span.backward(x, grad_out)
    _, activation = await span.forward_keep(x)
    assert activation is not None
    other_t = MemoryTransport(client_t.network, "other")
    await other_t.start()
    try:
        other = RemoteSpan(other_t, PeerAddr("server"), span.model, span.fingerprint, 0, 3, "none")
        got, _, _ = await other.backward(x, grad_out, activation=activation)  # another peer's: not taken
        assert close(got, expected) and server.recomputed == 1 and len(server.activations) == 1
    finally:
        await other_t.stop()
    await remote(0, 2).backward(x, grad_out, activation=activation)  # another call's (range): taken, recomputed
    assert server.recomputed == 2 and len(server.activations) == 0
    got, _, _ = await span.backward(x, grad_out, activation=activation)  # gone (taken): recomputed
    assert close(got, expected) and server.recomputed == 3


async def test_a_kept_hop_whose_server_died_is_recomputed_elsewhere() -> None:
    async with local_swarm((0, 3), (3, 6), (3, 6)) as (local, model):
        h = embed(model, torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(6))).detach()
        grad = torch.randn(2, 7, h.shape[-1], generator=torch.Generator().manual_seed(7))
        expected, _, _ = await backward(local.router, MODEL, h, grad, codec="none")
        _, chain = await forward_kept(local.router, MODEL, h, codec="none")
        assert [k.activation is not None for k in chain.pieces[0].hops] == [True, True]
        await local.kill(chain.pieces[0].hops[1].hop.peer_id)  # the server that kept blocks [3, 6)
        got, _, _ = await backward(local.router, MODEL, h, grad, codec="none", kept=chain)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        first = local.servers[chain.pieces[0].hops[0].hop.peer_id][0]
        assert first.activations.reused == 1 and len(first.activations) == 0  # the surviving hop reused its graph


async def test_a_pipelined_kept_forward_and_its_backward_equal_the_unsplit_ones() -> None:
    """A kept forward of 4 rows through 2 servers runs as 4 micro-batches (each server keeps 4 graphs); its backward
    runs them back as a pipeline too, reuses every graph, and gives the unsplit call's output and gradients: input,
    deep prompts, and LoRA weights (summed over the micro-batches)."""
    from tests.unit.daemon.test_session_reorder import random_lora

    async with local_swarm((0, 3), (3, 6)) as (local, model):
        gen = torch.Generator().manual_seed(8)
        h = embed(model, torch.randint(0, 128, (4, 7), generator=gen)).detach()
        mask = torch.ones(4, 7, dtype=torch.long)
        mask[1, :2] = 0  # left padding in one row
        prompts = torch.randn(N, 4, 2, h.shape[-1], generator=gen) * 0.1
        grad = torch.randn(4, 7, h.shape[-1], generator=gen)
        lora, _ = random_lora(model)
        args = dict(mask=mask, prompts=prompts, codec="none", lora=lora)
        want_out, whole = await forward_kept(local.router, MODEL, h, **args, pipeline_min_tokens=0)
        assert [(p.lo, p.hi) for p in whole.pieces] == [(0, 4)]
        want = await backward(local.router, MODEL, h, grad, **args, kept=whole)

        out, chain = await forward_kept(local.router, MODEL, h, **args, pipeline_min_tokens=4)
        assert [(p.lo, p.hi) for p in chain.pieces] == [(0, 1), (1, 2), (2, 3), (3, 4)]
        servers = [s for s, _, _ in local.servers.values()]
        assert all(len(s.activations) == 4 for s in servers)
        got = await backward(local.router, MODEL, h, grad, **args, kept=chain)
        assert got[2] is not None and want[2] is not None and got[2].keys() == want[2].keys()
        _assert_near(
            [(out, want_out), (got[0], want[0]), (got[1], want[1])] + [(got[2][k], want[2][k]) for k in want[2]]
        )
        assert all(s.recomputed == 0 and len(s.activations) == 0 for s in servers)
        assert all(s.activations.reused == 1 + 4 for s in servers)  # the unsplit call's graph, then the pieces'

        # no kept forward (a stateless caller): the forward re-runs as a pipeline, the servers recompute, same grads
        runs = [s.compute.forwards for s in servers]
        again = await backward(local.router, MODEL, h, grad, **args, pipeline_min_tokens=4)
        first = next(s for s in servers if s.span.start == 0)
        # 4 micro-batches: the first server re-runs each forward, then recomputes it in its backward; the last only
        assert [s.compute.forwards - r for s, r in zip(servers, runs, strict=True)] == [
            8 if s is first else 4 for s in servers
        ]
        assert again[2] is not None
        _assert_near([(again[0], want[0]), (again[1], want[1])] + [(again[2][k], want[2][k]) for k in want[2]])


def _assert_near(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each (got, want) within 1e-4 of want's largest magnitude: 1-row matmuls and per-piece LoRA sums round
    differently from the unsplit batch (bit-equal without LoRA)."""
    for got, want in pairs:
        diff = float((got - want).abs().max())
        assert diff <= 1e-4 * float(want.abs().max()), diff
