"""`Host`, the owner of what a daemon serves, on an in-memory transport and DHT: serve a plan, move it, unserve it.

Real daemons serving through the Host: tests/integration/test_server_daemons.py, test_rebalance.py, and
test_api_tensors.py (/v1/serve, /v1/unserve).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.identity import Identity
from petal.daemon.net.transport import MemoryNetwork, MemoryTransport
from petal.daemon.serving.errors import ServeError
from petal.daemon.serving.host import Host, HostedSpan
from petal.daemon.serving.settings import ServeSettings
from petal.protocol.records import MODELS_KEY, OFFLINE, ModelRecord, ServerRecord, block_key
from tests.support.tinymodels import tiny_llama

BLOCKS = 4


class Announcer:
    """The node's part: announce into the DHT, and remember what was withdrawn."""

    def __init__(self, dht: MemoryDHT) -> None:
        self.dht = dht
        self.withdrawn: list[str] = []

    async def announce(self, key: str, value: dict[str, Any]) -> int:
        return await self.dht.announce(key, value, ttl=60)

    async def withdraw(self, key: str) -> None:
        self.withdrawn.append(key)
        await self.dht.withdraw(key)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(num_hidden_layers=BLOCKS).save_pretrained(out)
    return out


@pytest.fixture
async def host(tmp_path: Path):
    identity = Identity.generate()
    transport = MemoryTransport(MemoryNetwork(), identity.peer_id)
    dht = MemoryDHT(identity, MemorySwarm())
    await transport.start()
    await dht.start()
    announcer = Announcer(dht)
    settings = ServeSettings(max_length=16, max_cache_tokens=64)
    host = Host(
        transport=transport,
        dht=dht,
        announcer=announcer,
        peer_id=identity.peer_id,
        settings=settings,
        state_dir=tmp_path,
        rebalance_period=3600.0,
    )
    yield host, dht, announcer
    await host.stop()
    await dht.stop()
    await transport.stop()


async def states(dht: MemoryDHT, model: str) -> list[str | None]:
    """The state this peer announces under each block key (None: no entry)."""
    out: list[str | None] = []
    for b in range(BLOCKS):
        entries = await dht.get(block_key(model, b))
        out.append(ServerRecord.from_entry(entries[0]).state if entries else None)
    return out


async def test_serve_then_unserve(host, model_dir: Path) -> None:
    host, dht, announcer = host
    plan = await host.plan(str(model_dir), blocks="1:3")
    assert (plan.start, plan.end, plan.rebalance) == (1, 3, False)
    events: list[dict[str, Any]] = []
    server = await host.serve(plan, events.append)
    name = plan.info.name
    assert [e["event"] for e in events] == ["loading", "loading", "measuring", "serving"]
    assert events[-1]["throughput"] > 0 and round(server.throughput, 3) == events[-1]["throughput"]
    assert host.served() == [HostedSpan(name, 1, 3)] and host.server_of(name) is server
    assert host.status()[0]["rebalancing"] is False
    assert await states(dht, name) == [None, "online", "online", None]
    assert ModelRecord.from_value((await dht.get(MODELS_KEY))[0].value).name == name
    with pytest.raises(ServeError, match="overlap"):  # spans of one model are disjoint
        await host.serve(await host.plan(str(model_dir), blocks="2:4"))
    with pytest.raises(ServeError, match="needs fixed blocks"):  # a span that may move could land on the other
        await host.serve(await host.plan(str(model_dir), num_blocks=1))

    second = await host.serve(await host.plan(str(model_dir), blocks="3:4"))  # a second span of the same model
    assert host.served() == [HostedSpan(name, 1, 3), HostedSpan(name, 3, 4)] and second is not server
    assert await states(dht, name) == [None, "online", "online", "online"]
    assert len(await dht.get(MODELS_KEY)) == 1  # one entry per signer, listing the model once
    with pytest.raises(ServeError, match="several spans"):
        await host.unserve(name)
    assert await host.unserve(name, 3) == [HostedSpan(name, 3, 4)]
    assert MODELS_KEY not in announcer.withdrawn  # blocks 1:3 still serve

    assert await host.unserve(name) == [HostedSpan(name, 1, 3)]
    assert host.served() == [] and await host.unserve(name) == []
    assert sorted(announcer.withdrawn) == sorted([block_key(name, b) for b in (1, 2, 3)] + [MODELS_KEY])
    assert await states(dht, name) == [None, OFFLINE, OFFLINE, OFFLINE]


async def test_num_blocks_plan_rebalances_and_moves(host, model_dir: Path) -> None:
    host, dht, announcer = host
    plan = await host.plan(str(model_dir), num_blocks=2)
    assert (plan.start, plan.end, plan.rebalance) == (0, 2, True)  # an empty swarm: the earliest window
    await host.serve(plan)
    name = plan.info.name
    assert host.status()[0]["rebalancing"] is True
    await host.move(name, (2, 4))
    assert host.served() == [HostedSpan(name, 2, 4)]
    assert await states(dht, name) == [OFFLINE, OFFLINE, "online", "online"]
    await host.stop()
    assert host.served() == []
    assert MODELS_KEY not in announcer.withdrawn  # on shutdown the node withdraws what is left


async def test_blocks_go_online_before_the_first_throughput_measurement(host, model_dir: Path, monkeypatch) -> None:
    """A span is announced online as soon as it is loaded: the first measurement (no cached figure yet) runs after,
    with the provisional figure announced meanwhile, and the measured one re-announced; a restart reads the cache."""
    import asyncio
    import threading

    from petal.daemon.serving import host as host_module

    host, dht, _ = host
    measuring, release = threading.Event(), threading.Event()
    real = host_module.cached_throughput

    def slow(server: Any, state_dir: Path) -> float:
        measuring.set()
        release.wait(30)
        return real(server, state_dir)

    monkeypatch.setattr(host_module, "cached_throughput", slow)
    plan = await host.plan(str(model_dir), blocks="0:2")
    serving = asyncio.create_task(host.serve(plan))
    assert await asyncio.to_thread(measuring.wait, 30)
    name = plan.info.name
    assert (await states(dht, name))[:2] == ["online", "online"]  # online while the measurement still runs
    record = ServerRecord.from_entry((await dht.get(block_key(name, 0)))[0])
    assert record.throughput == host_module.PROVISIONAL_THROUGHPUT
    release.set()
    server = await serving
    assert server.throughput > 0 and server.throughput != host_module.PROVISIONAL_THROUGHPUT
    record = ServerRecord.from_entry((await dht.get(block_key(name, 0)))[0])
    assert record.state == "online" and record.throughput == round(server.throughput, 3)
    measured = server.throughput

    await host.unserve(name)  # served again: the cached figure is announced from the start, nothing is measured
    measuring.clear()
    again = await host.serve(await host.plan(str(model_dir), blocks="0:2"))
    assert not measuring.is_set() and again.throughput == measured
