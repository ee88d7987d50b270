"""Inference steps run on the event loop (`ComputeWorker.run_inline`, `InferenceSession._submit`).

A server whose only open session sends a small step, while its compute thread is idle, computes that step on the
event loop: no thread hand-off on the way in or out. With a second session open, steps go to the compute thread
again, where concurrent ones batch. Outputs must not depend on the path (fp32 |diff| <= 1e-5 x max(1, |ref|)).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from petal.daemon.routing.session import InferenceSession
from petal.daemon.serving.settings import ServeSettings
from petal.daemon.serving.worker import INFERENCE, TRAINING, ComputeWorker, Jobs
from petal.kernels.span import Span
from tests.support.swarms import MODEL, N, embed, logits

ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    diff, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert diff <= ATOL * scale, f"max |diff| {diff} > {ATOL} x {scale}"


async def test_worker_runs_inline_only_when_idle() -> None:
    worker = ComputeWorker(max_queue=4)
    gate = threading.Event()
    try:
        done = worker.run_inline(threading.get_ident)
        assert done is not None and done.done() and done.result() == threading.get_ident()  # on this thread
        failed = worker.run_inline(int, "not a number")
        assert failed is not None and isinstance(failed.exception(), ValueError)  # the job's error, not raised here
        held = worker.submit(TRAINING, gate.wait, 10)
        for _ in range(1000):  # bounded: until the thread holds the gate job
            if not worker._heap:
                break
            await asyncio.sleep(0.01)
        assert worker.run_inline(str, "x") is None  # the thread computes: nothing runs beside it
        queued = worker.submit(INFERENCE, str, "queued")
        gate.set()
        assert await asyncio.wrap_future(held) and await asyncio.wrap_future(queued) == "queued"
        for _ in range(1000):  # bounded: until the thread is idle again
            if not worker._busy:
                break
            await asyncio.sleep(0.01)
        again = worker.run_inline(str, "again")
        assert again is not None and again.result() == "again"
        assert worker.inline == 3
    finally:
        gate.set()
        worker.stop()


async def test_jobs_inline_falls_back_to_the_thread() -> None:
    jobs = Jobs(max_queue=4, timeout=10)
    jobs.start()
    gate = threading.Event()
    here = threading.get_ident()
    try:
        assert await jobs.finish(jobs.submit(INFERENCE, threading.get_ident, inline=True)) == here  # idle: inline
        assert await jobs.finish(jobs.submit(INFERENCE, threading.get_ident)) != here  # not asked: the thread
        held = jobs.submit(TRAINING, gate.wait, 10)
        busy = jobs.submit(INFERENCE, threading.get_ident, inline=True)  # the thread is busy or has a job queued
        assert not busy.done()
        gate.set()
        await jobs.finish(held)
        assert await jobs.finish(busy) != here
        assert jobs.batch_stats()["inline_steps"] == 1 and jobs.submitted == [3, 1]
    finally:
        gate.set()
        await jobs.stop()


@pytest.mark.parametrize("inline", [True, False])
async def test_the_only_session_steps_inline(swarm, model, inline: bool) -> None:
    await swarm.add(0, N, settings=ServeSettings(inline_steps=inline))
    server = next(iter(swarm.servers.values()))[0]
    ref = Span.from_model(model, 0, N)
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    steps = 6
    cache = ref.new_cache(1, 32, torch.float32, "cpu")
    async with InferenceSession(swarm.router, MODEL, max_length=32, codec="none") as session:
        inp = prompt
        with torch.no_grad():
            for _ in range(steps):
                out = await session.step(embed(model, inp))
                want = ref.step(embed(model, inp), cache)
                _close(out, want)
                inp = logits(model, out[:, -1]).argmax(-1)[:, None]
                assert torch.equal(inp, logits(model, want[:, -1]).argmax(-1)[:, None])
        assert server.jobs.batch_stats()["inline_steps"] == (steps if inline else 0)
        # a second session open: steps go to the compute thread (where concurrent steps batch)
        async with InferenceSession(swarm.router, MODEL, max_length=32, codec="none") as other:
            await other.step(embed(model, prompt))
            await session.step(embed(model, inp))
        assert server.jobs.batch_stats()["inline_steps"] == (steps if inline else 0)
