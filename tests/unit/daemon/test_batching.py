"""Continuous batching on a BlockServer (petal.daemon.serving.batching), through real sessions in one process.

Determinism: a gate job holds the server's compute thread while every session's step (or every forward call) is
queued, so each round runs as ONE batch; the batch counters prove it. Outputs must equal each request run alone
(fp32: |diff| <= 1e-5 x max(1, |ref|)), and greedy tokens must be identical.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any

import torch

from petal.daemon.routing.calls import backward, forward
from petal.daemon.routing.session import InferenceSession
from petal.daemon.serving.batching import Batch
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.settings import ServeSettings
from petal.daemon.serving.worker import INFERENCE, TRAINING, ComputeWorker
from petal.kernels.span import Span
from tests.support.swarms import MODEL, N, embed, logits

ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    diff, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert diff <= ATOL * scale, f"max |diff| {diff} > {ATOL} x {scale}"


async def _one_batch(server: BlockServer, calls: list[Awaitable[Any]]) -> list[Any]:
    """Run `calls` while the compute thread is held, so that all of them are queued before it takes one."""
    gate = threading.Event()
    held = server.jobs.submit(TRAINING, gate.wait, 10)
    tasks = [asyncio.ensure_future(c) for c in calls]
    worker = server.jobs._worker
    assert worker is not None
    try:
        for _ in range(1000):  # bounded: up to 10 s for every request to reach the queue
            if len(worker._heap) >= len(calls):
                break
            await asyncio.sleep(0.01)
        assert len(worker._heap) == len(calls)
    finally:
        gate.set()
    await asyncio.wrap_future(held)
    return await asyncio.gather(*tasks)


async def test_concurrent_sessions_batched_equal_alone(swarm, model) -> None:
    await swarm.add(0, N)
    server = next(iter(swarm.servers.values()))[0]
    ref = Span.from_model(model, 0, N)
    prompts = [
        torch.randint(0, 128, (b, n), generator=torch.Generator().manual_seed(n)) for b, n in [(1, 3), (2, 5), (1, 8)]
    ]
    steps = 4
    sessions = [InferenceSession(swarm.router, MODEL, max_length=16, batch=p.shape[0], codec="none") for p in prompts]
    for s in sessions:
        await s.__aenter__()
    try:
        # alone: the same kernels, one session at a time, each with its own cache
        caches = [ref.new_cache(p.shape[0], 16, torch.float32, "cpu") for p in prompts]
        want_tokens: list[list[torch.Tensor]] = [[] for _ in prompts]
        want_out: list[list[torch.Tensor]] = [[] for _ in prompts]
        with torch.no_grad():
            for i, (p, c) in enumerate(zip(prompts, caches, strict=True)):
                inp = p
                for _ in range(steps):
                    out = ref.step(embed(model, inp), c)
                    want_out[i].append(out)
                    inp = logits(model, out[:, -1]).argmax(-1)[:, None]
                    want_tokens[i].append(inp)
            # batched: every round is one batch of the three sessions (round 0: prefills of 3, 5 and 8 tokens)
            inputs = list(prompts)
            for r in range(steps):
                outs = await _one_batch(
                    server, [s.step(embed(model, x)) for s, x in zip(sessions, inputs, strict=True)]
                )
                for i, out in enumerate(outs):
                    _close(out, want_out[i][r])
                inputs = [logits(model, out[:, -1]).argmax(-1)[:, None] for out in outs]
                for i, tok in enumerate(inputs):
                    assert torch.equal(tok, want_tokens[i][r])
    finally:
        for s in sessions:
            await s.__aexit__(None, None, None)
    stats = server.jobs.batch_stats()
    assert stats["step_batches"] == steps and stats["step_batched_jobs"] == 3 * steps
    assert stats["step_largest_batch"] == 3


async def test_forward_and_backward_batched_equal_alone(swarm, model) -> None:
    await swarm.add(0, N)
    server = next(iter(swarm.servers.values()))[0]
    ref = Span.from_model(model, 0, N)
    g = torch.Generator().manual_seed(7)
    hs = [embed(model, torch.randint(0, 128, (b, 6), generator=g)).detach() for b in (1, 2, 1)]
    grads = [torch.randn(h.shape, generator=g) for h in hs]
    outs = await _one_batch(server, [forward(swarm.router, MODEL, h, codec="none") for h in hs])
    with torch.no_grad():
        for h, out in zip(hs, outs, strict=True):
            _close(out, ref(h))
    assert server.jobs.batch_stats()["training_batches"] == 1
    got = await _one_batch(
        server, [backward(swarm.router, MODEL, h, gr, codec="none") for h, gr in zip(hs, grads, strict=True)]
    )
    for h, gr, (grad_in, _, _) in zip(hs, grads, got, strict=True):
        leaf = h.clone().requires_grad_(True)
        ref(leaf).backward(gr)
        assert leaf.grad is not None
        _close(grad_in, leaf.grad)
    stats = server.jobs.batch_stats()
    assert stats["training_batches"] == 2 and stats["training_batched_jobs"] == 6


async def test_batching_off_runs_one_by_one(swarm, model) -> None:
    await swarm.add(0, N, settings=ServeSettings(max_batch_tokens=0))
    server = next(iter(swarm.servers.values()))[0]
    hs = [
        embed(model, torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(i))).detach()
        for i in range(3)
    ]
    await _one_batch(server, [forward(swarm.router, MODEL, h, codec="none") for h in hs])
    assert server.jobs.batch_stats()["training_batches"] == 0


async def test_worker_batches_equal_keys_within_the_token_budget() -> None:
    worker = ComputeWorker(max_queue=16, max_batch_tokens=10)
    gate, runs = threading.Event(), []

    def run(items: list[Any]) -> list[object]:
        runs.append(list(items))
        return [f"batched {i}" for i in items]

    try:
        held = worker.submit(TRAINING, gate.wait, 10)
        for _ in range(1000):  # bounded: until the thread holds the gate job
            if not worker._heap:
                break
            await asyncio.sleep(0.01)
        futures = [
            worker.submit(INFERENCE, str, f"alone {i}", batch=Batch("k" if i != 2 else "other", 4, run, i))
            for i in range(5)
        ]
        futures[3].cancel()  # a job given up on takes no room in a batch
        gate.set()
        await asyncio.wrap_future(held)
        got = [await asyncio.wrap_future(f) for i, f in enumerate(futures) if i != 3]
        assert got == ["batched 0", "batched 1", "alone 2", "alone 4"]  # 0 + 1 = 8 tokens; 4 more would be 12 > 10
        assert runs == [[0, 1]] and worker.batches[INFERENCE] == 1 and worker.largest[INFERENCE] == 2
    finally:
        gate.set()
        worker.stop()
