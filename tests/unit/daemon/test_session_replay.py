"""Issue #16 finding 7, failover side: a history that no longer fits one request is replayed in pieces.

Every step the caller sent fitted the servers' limits, but a replacement hop gets the whole history at once; that
request must not become a "too_large" (the caller's error) in the middle of a failover. With the replay piece size
made tiny, a failover replays in many pieces and the tokens stay identical (in-memory swarm, real BlockServers).
"""

from __future__ import annotations

import pytest
import torch

from petal.daemon.routing import session as session_module
from petal.daemon.routing.faults import is_server_fault
from petal.daemon.routing.session import InferenceSession
from petal.daemon.serving.settings import ServeSettings
from petal.protocol.errors import PetalError
from tests.support.swarms import MODEL, LocalSwarm, N, embed

from .test_session import generate


async def test_a_long_history_is_replayed_in_pieces_with_identical_tokens(swarm, model, monkeypatch):
    for a, b in [(0, 2), (2, 4), (2, 4), (4, 6)]:
        await swarm.add(a, b)
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    want, failovers = await generate(swarm, model, prompt, 16, codec="none")
    assert failovers == 0
    pieces: list[int] = []
    real_step = session_module.RemoteInference.step

    async def counting_step(self, hidden, *args, **kwargs):
        pieces.append(hidden.shape[1])
        return await real_step(self, hidden, *args, **kwargs)

    monkeypatch.setattr(session_module, "REPLAY_CHUNK_BYTES", 3 * model.config.hidden_size * 4)  # 3 tokens a piece
    monkeypatch.setattr(session_module.RemoteInference, "step", counting_step)
    got, failovers = await generate(swarm, model, prompt, 16, kill_after=8, codec="none")
    assert failovers == 1 and got == want
    assert pieces and max(pieces) <= 3 and sum(pieces) >= prompt.shape[1] + 7, pieces


async def add_limited(swarm: LocalSwarm, start: int, end: int, **limits: int) -> str:
    """A server of blocks [start, end) with its own limits (LocalSwarm.add with ServeSettings; no throughput)."""
    return await swarm.add(start, end, throughput=0.0, settings=ServeSettings(**limits))


async def test_sessions_route_around_servers_too_small_for_them_and_never_ban_them(swarm, model):
    small = await add_limited(swarm, 0, N, max_length=8, max_batch=1)
    big = await add_limited(swarm, 0, N)
    x = embed(model, torch.randint(0, 128, (2, 3)))
    async with InferenceSession(swarm.router, MODEL, max_length=32, batch=2) as s:
        assert [h.peer_id for h in s.chain] == [big]
        assert (await s.step(x)).shape == x.shape
    for max_length, batch, code in ((32, 1, "max_length"), (8, 2, "too_large")):  # without the big one
        with pytest.raises(PetalError) as e:
            async with InferenceSession(swarm.router, MODEL, max_length=max_length, batch=batch, blocked=[big]):
                pass
        assert e.value.code == code and "ask for less" in e.value.message, e.value
        assert not is_server_fault(e.value)
    assert not swarm.router.is_banned(small)
    async with InferenceSession(swarm.router, MODEL, max_length=8, batch=1, blocked=[big]) as s:
        assert [h.peer_id for h in s.chain] == [small]
        assert (await s.step(x[:1])).shape == (1, 3, x.shape[2])
