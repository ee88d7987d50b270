"""One contract, two DHTs: every test here runs against the UDP ``DHT`` on loopback and the in-memory ``MemoryDHT``.

Like trio's ``_check_streams``: the ``SwarmDHT`` semantics the daemon relies on (announce/get, entries of several
signers merged, one entry per signer, expiry by TTL, withdraw, get_many, refused TTLs) are written once, so the
in-memory twin cannot drift from the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.protocol.records import (
    MAX_CLOCK_SKEW,
    MAX_RECORD_BYTES,
    MAX_TTL,
    MODELS_KEY,
    RecordError,
    block_key,
    key_digest,
    sign_entry,
)

pytestmark = pytest.mark.timeout(60)

KEY = block_key("HuggingFaceTB/SmolLM2-135M", 3)
OTHER = block_key("HuggingFaceTB/SmolLM2-135M", 4)

ATTACKER = "127.0.0.2"  # a source address other than the honest nodes' 127.0.0.1


class MakeNodes:
    """``await make_nodes(n)``: n started nodes that see each other; ``flood``: a hostile store from another address."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.started: list[DHT | MemoryDHT] = []
        self.swarm = MemorySwarm()
        self.attacker: DHT | None = None

    async def __call__(self, n: int) -> list[SwarmDHT]:
        nodes: list[DHT | MemoryDHT] = []
        for _ in range(n):
            if self.kind == "udp":
                node: DHT | MemoryDHT = DHT(Identity.generate(), rpc_timeout=0.5)
                first = self.started[0] if self.started else None
                await node.start([("127.0.0.1", first.port)] if isinstance(first, DHT) else [])
            else:
                node = MemoryDHT(Identity.generate(), self.swarm)
                await node.start()
            self.started.append(node)
            nodes.append(node)
        return list(nodes)

    async def flood(self, key: str, records: Sequence[bytes]) -> int:
        """Store ``records`` on every node from ATTACKER, as a store RPC would (UDP: ten records per datagram).
        Returns how many records were taken, over all nodes."""
        if self.kind == "memory":
            return self.swarm.store(key, records, ATTACKER)
        if self.attacker is None:
            self.attacker = DHT(Identity.generate(), host=ATTACKER, rpc_timeout=0.5)
            await self.attacker.start()
        taken = 0
        for node in self.started:
            assert isinstance(node, DHT)
            for i in range(0, len(records), 10):
                addr = ("127.0.0.1", node.port)
                chunk = list(records[i : i + 10])
                ok, n = await self.attacker.protocol._call(addr, "store", self.attacker.node_id, key_digest(key), chunk)
                assert ok, "the attacker's store got no reply"
                taken += n if isinstance(n, int) else 0
        return taken

    async def stop(self) -> None:
        for node in [*self.started, *([self.attacker] if self.attacker else [])]:
            await node.stop()


@pytest.fixture(params=["udp", "memory"])
async def make_nodes(request: pytest.FixtureRequest) -> AsyncIterator[MakeNodes]:
    """``await make_nodes(n)``: n started nodes that see each other; all stopped after the test."""
    maker = MakeNodes(request.param)
    try:
        yield maker
    finally:
        await maker.stop()


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


def full_size_records(key: str, count: int) -> list[bytes]:
    """``count`` records of fresh identities, each padded to the size limit and dated as far ahead as is accepted."""
    issued = time.time() + MAX_CLOCK_SKEW - 2
    records = []
    for i in range(count):
        fake = Identity.generate()
        value, record = {"n": f"fake/model-{i}", "st": "online", "x": ""}, b""
        while True:
            value["x"] += "A" * 8
            try:
                entry = sign_entry(fake, key, value, issued_at=issued, expires_at=issued + MAX_TTL)
            except RecordError:
                break
            record = entry.to_record()
        records.append(record)
    assert all(len(r) > MAX_RECORD_BYTES - 8 for r in records)
    return records


@pytest.mark.parametrize("key", [MODELS_KEY, KEY])
async def test_many_identities_on_one_address_cannot_crowd_out_servers(make_nodes: MakeNodes, key: str) -> None:
    """Issue #16 finding 13: fake identities from one address, full-size and future-dated, evicted every server."""
    nodes = await make_nodes(3)
    servers, client = nodes[:2], nodes[2]
    for server in servers:
        await server.announce(key, {"n": "HuggingFaceTB/SmolLM2-135M", "st": "online"}, ttl=60)
    honest = {identity_of(s).peer_id for s in servers}
    assert {e.peer_id for e in await client.get(key)} == honest
    assert await make_nodes.flood(key, full_size_records(key, 30)) > 0
    assert honest <= {e.peer_id for e in await client.get(key)}
    for server in servers:  # the periodic re-announce is taken, and wins over the flood's future dates
        assert await server.announce(key, {"n": "HuggingFaceTB/SmolLM2-135M", "st": "online", "t": 1.0}, ttl=60) >= 1
    await make_nodes.flood(key, full_size_records(key, 30))  # the key is full of the first flood: none need be taken
    entries = {e.peer_id: e for e in await client.get(key)}
    assert honest <= set(entries) and all(entries[p].value.get("t") == 1.0 for p in honest)
