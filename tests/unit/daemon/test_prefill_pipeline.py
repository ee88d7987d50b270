"""A long session step (a prompt's prefill) runs as a pipeline of position chunks through real in-process servers
(`chains.prefill_parts`, `InferenceSession._step_pipelined`): each server gets the chunks in order, one at a time,
while the next server runs the chunk ahead; the output and the caches (the decode steps after it) equal the unsplit
step's, deep prompts and left padding included; a server dying mid-pipeline is replaced and the step still gives the
right output."""

from __future__ import annotations

import itertools

import pytest
import torch

from petal.daemon.routing.chains import prefill_parts
from petal.daemon.routing.remote import RemoteInference
from petal.daemon.routing.session import InferenceSession
from tests.support.swarms import MODEL, N, embed, logits


def test_prefill_parts_cut_positions_in_near_equal_contiguous_chunks():
    assert prefill_parts(1, 512, 3) == [(0, 128), (128, 256), (256, 384), (384, 512)]  # none under 128 tokens
    sizes = [hi - lo for lo, hi in prefill_parts(1, 4096, 3)]
    assert sizes == [683, 683, 683, 683, 682, 682]  # 2 chunks per hop at most
    assert prefill_parts(2, 256, 3) == [(0, 64), (64, 128), (128, 192), (192, 256)]  # 2 rows x 64 = 128 tokens
    assert prefill_parts(1, 512, 1) == [(0, 512)]  # one server: nothing to overlap
    assert prefill_parts(1, 200, 3) == [(0, 200)]
    for tokens in range(1, 60):
        for hops in range(4):
            parts = prefill_parts(1, tokens, hops, min_tokens=1)
            assert parts[0][0] == 0 and parts[-1][1] == tokens
            assert all(p[1] == q[0] and p[0] < p[1] for p, q in itertools.pairwise(parts))
            assert len(parts) <= max(1, 2 * hops)
    with pytest.raises(ValueError):
        prefill_parts(1, 0, 3)


@pytest.fixture
def recorded(monkeypatch):
    """Every round-trip step a session makes: (peer, "start"/"end", position), in order."""
    log: list[tuple[str, str, int]] = []
    step = RemoteInference.step

    async def recording(self, hidden, mask=None, position=None, prompts=None, timeout=60.0, reorder=None):
        peer = self.span.peer.peer_id
        log.append((peer, "start", position))
        out = await step(self, hidden, mask, position, prompts, timeout, reorder)
        log.append((peer, "end", position))
        return out

    monkeypatch.setattr(RemoteInference, "step", recording)
    return log


async def _run(swarm, x, mask, prompts, decode, *, min_tokens):
    """The prefill's output and two decode steps' after it, with the router's pipeline at ``min_tokens``."""
    swarm.router.pipeline_min_tokens = min_tokens
    batch, t, _ = x.shape
    async with InferenceSession(swarm.router, MODEL, max_length=t + 2, batch=batch, prompts=prompts, codec="none") as s:
        with torch.no_grad():
            outs = [await s.step(x, None if mask is None else mask[:, :t])]
            for i in range(2):
                outs.append(await s.step(decode[:, i : i + 1], None if mask is None else mask[:, : t + i + 1]))
        assert [(h.start, h.end) for h in s.chain] == [(0, 2), (2, 4), (4, 6)]
        return outs, s.failovers


async def test_a_long_step_runs_as_a_pipeline_and_equals_the_unsplit_step(swarm, model, recorded):
    peers = [await swarm.add(a, b) for a, b in [(0, 2), (2, 4), (4, 6)]]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    x, decode = embed(model, ids), embed(model, torch.randint(0, 128, (2, 2), generator=g))
    mask = torch.ones(2, 26, dtype=torch.long)
    mask[1, :5] = 0  # row 1 is left-padded
    prompts = torch.randn(N, 2, 6, x.shape[2], generator=g)  # deep prompts over the first 6 positions: 2 chunks
    want, _ = await _run(swarm, x, mask, prompts, decode, min_tokens=0)
    assert not recorded, "with the pipeline off the prefill is one pass along the chain (push)"

    got, failovers = await _run(swarm, x, mask, prompts, decode, min_tokens=8)  # 48 tokens: 6 chunks of 4 positions
    assert failovers == 0
    real = mask[:, :24].bool()  # left padding's own outputs are meaningless (they attend to nothing)
    torch.testing.assert_close(got[0][real], want[0][real], atol=1e-5, rtol=0)
    for a, b in zip(got[1:], want[1:], strict=True):  # the decode steps: every cache holds the same positions
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    prefill = [e for e in recorded if e[2] < 24]
    for peer in peers:  # each server: the 6 chunks in order, one at a time
        mine = [(kind, pos) for p, kind, pos in prefill if p == peer]
        assert mine == [(kind, pos) for pos in range(0, 24, 4) for kind in ("start", "end")]
    busy, overlapped = set(), False
    for peer, kind, _ in prefill:
        busy.add(peer) if kind == "start" else busy.discard(peer)
        overlapped |= len(busy) > 1
    assert overlapped, "the chain's servers never ran chunks at the same time"


async def test_a_server_dying_mid_pipeline_is_replaced_and_the_step_is_right(swarm, model, recorded, monkeypatch):
    await swarm.add(0, 2)
    victim = await swarm.add(2, 4)
    await swarm.add(4, 6)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    x, decode = embed(model, ids), embed(model, ids[:, :2])
    want, _ = await _run(swarm, x, None, None, decode, min_tokens=0)
    spare = await swarm.add(2, 4)
    swarm.router.record_latency(victim, 0.0)  # the chain takes the victim, not the spare
    swarm.router.record_latency(spare, 1.0)
    step = RemoteInference.step

    async def dies_at_chunk_3(self, hidden, mask=None, position=None, prompts=None, timeout=60.0, reorder=None):
        if self.span.peer.peer_id == victim and position == 12:
            await swarm.kill(victim)
        return await step(self, hidden, mask, position, prompts, timeout, reorder)

    monkeypatch.setattr(RemoteInference, "step", dies_at_chunk_3)
    got, failovers = await _run(swarm, x, None, None, decode, min_tokens=4)
    assert failovers == 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


async def test_a_caller_error_mid_pipeline_is_raised_and_the_session_stays_usable(swarm, model, monkeypatch):
    from petal.protocol.errors import PetalError

    for a, b in [(0, 2), (2, 4), (4, 6)]:
        await swarm.add(a, b)
    swarm.router.pipeline_min_tokens = 4
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(7))
    x = embed(model, ids)
    step = RemoteInference.step
    refused: list[int] = []

    async def refuses_once(self, hidden, mask=None, position=None, prompts=None, timeout=60.0, reorder=None):
        if position == 12 and not refused:
            refused.append(position)
            raise PetalError("wrong_shape", "refused for the test")
        return await step(self, hidden, mask, position, prompts, timeout, reorder)

    monkeypatch.setattr(RemoteInference, "step", refuses_once)
    async with InferenceSession(swarm.router, MODEL, max_length=24, codec="none") as s:
        with torch.no_grad(), pytest.raises(PetalError) as e:
            await s.step(x)
        assert e.value.code == "wrong_shape" and s.position == 0
        with torch.no_grad():
            got = await s.step(x)  # the same session, the same prompt: no server was banned or replaced
        assert s.failovers == 0 and not swarm.router.bans.is_banned(s.chain[0].peer_id)
        torch.testing.assert_close(logits(model, got), model(ids).logits, atol=1e-4, rtol=0)
