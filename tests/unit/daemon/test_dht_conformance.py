"""One contract, two DHTs: every test here runs against the UDP ``DHT`` on loopback and the in-memory ``MemoryDHT``.

Like trio's ``_check_streams``: the ``SwarmDHT`` semantics the daemon relies on (announce/get, entries of several
signers merged, one entry per signer, expiry by TTL, withdraw, get_many, refused TTLs) are written once, so the
in-memory twin cannot drift from the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.protocol.records import MAX_TTL, RecordError, block_key

pytestmark = pytest.mark.timeout(60)

KEY = block_key("HuggingFaceTB/SmolLM2-135M", 3)
OTHER = block_key("HuggingFaceTB/SmolLM2-135M", 4)

MakeNodes = Callable[[int], Awaitable[list[SwarmDHT]]]


@pytest.fixture(params=["udp", "memory"])
async def make_nodes(request: pytest.FixtureRequest) -> AsyncIterator[MakeNodes]:
    """``await make_nodes(n)``: n started nodes that see each other; all stopped after the test."""
    started: list[DHT | MemoryDHT] = []
    swarm = MemorySwarm()

    async def make(n: int) -> list[SwarmDHT]:
        nodes: list[DHT | MemoryDHT] = []
        for _ in range(n):
            if request.param == "udp":
                node: DHT | MemoryDHT = DHT(Identity.generate(), rpc_timeout=0.5)
                bootstrap = [("127.0.0.1", started[0].port)] if started and isinstance(started[0], DHT) else []
                await node.start(bootstrap)
            else:
                node = MemoryDHT(Identity.generate(), swarm)
                await node.start()
            started.append(node)
            nodes.append(node)
        return list(nodes)

    try:
        yield make
    finally:
        for node in started:
            await node.stop()


def identity_of(node: SwarmDHT) -> Identity:
    assert isinstance(node, DHT | MemoryDHT)
    return node.identity


async def test_announce_then_get_from_another_node(make_nodes: MakeNodes) -> None:
    a, b = await make_nodes(2)
    assert await a.announce(KEY, {"st": "online", "t": 5.0}, ttl=60) >= 1
    (entry,) = await b.get(KEY)
    me = identity_of(a)
    assert entry.peer_id == me.peer_id and entry.public_key == me.public_key
    assert entry.key == KEY and entry.value == {"st": "online", "t": 5.0} and entry.state == "online"
    assert entry.expires_at - entry.issued_at == pytest.approx(60)
    assert await b.get(OTHER) == []


async def test_signers_merge_freshest_first_one_entry_each(make_nodes: MakeNodes) -> None:
    nodes = await make_nodes(3)
    for i, node in enumerate(nodes):
        await node.announce(KEY, {"t": float(i)}, ttl=60)
    await nodes[0].announce(KEY, {"t": 10.0}, ttl=60)  # replaces node 0's own entry, leaves the others
    entries = await nodes[2].get(KEY)
    assert [e.peer_id for e in entries] == [identity_of(n).peer_id for n in (nodes[0], nodes[2], nodes[1])]
    assert [e.value["t"] for e in entries] == [10.0, 2.0, 1.0]
    assert entries == sorted(entries, key=lambda e: -e.issued_at)


async def test_entry_expires_after_its_ttl(make_nodes: MakeNodes) -> None:
    a, b = await make_nodes(2)
    await a.announce(KEY, {"t": 1.0}, ttl=0.5)
    await b.announce(KEY, {"t": 2.0}, ttl=60)
    first = await a.get(KEY)
    assert len(first) == 2
    short = next(e for e in first if e.peer_id == identity_of(a).peer_id)
    await asyncio.sleep(max(0.0, short.expires_at - time.time()) + 0.05)
    for node in (a, b):
        assert [e.peer_id for e in await node.get(KEY)] == [identity_of(b).peer_id]


async def test_withdraw_leaves_an_offline_entry_with_the_last_value(make_nodes: MakeNodes) -> None:
    a, b = await make_nodes(2)
    await a.announce(KEY, {"st": "online", "s": [0, 30]}, ttl=60)
    await b.announce(KEY, {"st": "online", "s": [30, 60]}, ttl=60)
    await a.withdraw(KEY)
    entries = {e.peer_id: e for e in await b.get(KEY)}
    withdrawn = entries[identity_of(a).peer_id]
    assert withdrawn.state == "offline" and withdrawn.value["s"] == [0, 30]
    assert withdrawn.expires_at - withdrawn.issued_at <= MAX_TTL
    assert entries[identity_of(b).peer_id].state == "online"
    await a.withdraw(OTHER)  # never announced: an offline entry with nothing else
    (entry,) = await b.get(OTHER)
    assert entry.value == {"st": "offline"}


async def test_get_many_reads_every_key(make_nodes: MakeNodes) -> None:
    a, b = await make_nodes(2)
    await a.announce(KEY, {"t": 1.0}, ttl=60)
    await b.announce(KEY, {"t": 2.0}, ttl=60)
    await b.announce(OTHER, {"t": 3.0}, ttl=60)
    empty = block_key("HuggingFaceTB/SmolLM2-135M", 5)
    many = await a.get_many([KEY, OTHER, empty])
    assert list(many) == [KEY, OTHER, empty]
    assert {e.value["t"] for e in many[KEY]} == {1.0, 2.0}
    assert [e.value["t"] for e in many[OTHER]] == [3.0] and many[empty] == []


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL + 1])
async def test_announce_refuses_a_bad_ttl(make_nodes: MakeNodes, ttl: float) -> None:
    (a,) = await make_nodes(1)
    with pytest.raises(RecordError, match="ttl"):
        await a.announce(KEY, {"t": 1.0}, ttl=ttl)


async def test_announce_refuses_a_value_that_is_not_a_dict(make_nodes: MakeNodes) -> None:
    (a,) = await make_nodes(1)
    with pytest.raises(RecordError, match="dict"):
        await a.announce(KEY, ["not", "a", "dict"], ttl=60)  # type: ignore[arg-type]  # what the check is for
