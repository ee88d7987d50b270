"""`BlockServer.drain` in one process: it announces "draining" (which routers skip and placement does not count),
refuses new sessions with "unavailable", lets an open session step on, closes sessions still open at the bound (their
clients fail over), and stops. (`Host.unserve` and SIGTERM drain through it: tests/integration/test_drain.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from petal.daemon.net.transport import MemoryNetwork, MemoryTransport, PeerAddr
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.routing.swarm import group_servers
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.placement import choose_span
from petal.daemon.serving.settings import ServeSettings
from petal.kernels.store import load_span, open_model
from petal.protocol.errors import PetalError
from petal.protocol.records import ServerRecord
from tests.support.blocks import HIDDEN, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(out)
    return out


@pytest.fixture
async def served(model_dir: Path):
    info = open_model(model_dir)
    network = MemoryNetwork()
    server_t, client_t = MemoryTransport(network, "server"), MemoryTransport(network, "client")
    await server_t.start()
    await client_t.start()
    announced: list[tuple[str, dict]] = []

    async def announce(key: str, value: dict) -> None:
        announced.append((key, value))

    async def withdraw(key: str) -> None:
        pass

    settings = ServeSettings(max_batch=2, max_length=32, max_cache_tokens=4 * 2 * 32, contended_idle_timeout=0.2)
    server = BlockServer(
        load_span(info, 0, 4),
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=info.num_blocks,
        transport=server_t,
        settings=settings,
        announce=announce,
        withdraw=withdraw,
        throughput=1.0,
    )
    await server.start()
    remote = RemoteSpan(client_t, PeerAddr("server"), info.name, info.fingerprint, 0, 4, "none")
    yield server, remote, announced
    await server.stop()
    await client_t.stop()
    await server_t.stop()


async def test_drain_lets_an_active_session_finish_and_refuses_new_ones(served) -> None:
    server, remote, announced = served
    session = await remote.open_inference(max_length=16, batch=1)
    await session.step(torch.randn(1, 2, HIDDEN))
    drained = asyncio.create_task(server.drain(timeout=30))
    for _ in range(100):
        if server.draining:
            break
        await asyncio.sleep(0.01)
    last = [v for k, v in announced if k != "_models"][-1]
    assert last["st"] == "draining"
    record = ServerRecord.from_value(last, "server")
    assert group_servers([("server", last)]) == {}  # routers skip it
    assert choose_span({b: [last] for b in range(4)}, 4, 4) == (0, 4)  # nor does placement count it
    assert record.state == "draining"
    with pytest.raises(PetalError) as e:
        await remote.open_inference(max_length=8, batch=1)
    assert e.value.code == "unavailable"
    for _ in range(5):  # the open session steps on (never idle for the 0.2 s grace)
        assert (await session.step(torch.randn(1, 1, HIDDEN))).shape == (1, 1, HIDDEN)
    assert not drained.done()
    await session.close()
    await asyncio.wait_for(drained, timeout=10)  # done once its last session ended, not at the bound
    assert not server.jobs.open


async def test_drain_closes_sessions_left_at_its_bound(served) -> None:
    server, remote, _ = served
    session = await remote.open_inference(max_length=16, batch=1)
    await session.step(torch.randn(1, 2, HIDDEN))
    server.settings = ServeSettings(**{**server.settings.__dict__, "contended_idle_timeout": 60.0})
    await asyncio.wait_for(server.drain(timeout=0.3), timeout=10)  # idle but within its grace: closed at the bound
    with pytest.raises(PetalError) as e:
        await session.step(torch.randn(1, 1, HIDDEN))
    assert e.value.code == "unavailable" and "another server" in e.value.message
