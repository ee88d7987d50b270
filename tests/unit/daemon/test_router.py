"""Route choice without a network (pure functions), and the swarm view read from real in-process DHT nodes."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from petal.daemon.routing.bans import BanList
from petal.daemon.routing.chains import (
    Hop,
    min_latency_chain,
    no_route_error,
    select_servers,
    split_batch,
    throughput_chain,
    uncovered,
)
from petal.daemon.routing.swarm import ServerInfo, SwarmView, group_servers
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY, ModelRecord, ServerRecord, block_key


def S(peer: str, start: int, end: int, throughput: float = 100.0, **kw) -> ServerInfo:
    return ServerInfo(peer, start, end, throughput, **kw)


def spans(chain: list[Hop]) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in chain]


def no_compute(_: ServerInfo) -> float:
    return 0.0


# --- min_latency_chain ----------------------------------------------------------------------------------------------


def test_min_latency_prefers_fewer_hops_when_latency_dominates():
    servers = [S("a", 0, 10), S("b", 10, 20), S("c", 20, 30), S("big", 0, 30)]
    chain = min_latency_chain(servers, 0, 30, {"a": 0.01, "b": 0.01, "c": 0.01, "big": 0.02}, no_compute)
    assert spans(chain) == [("big", 0, 30)]
    chain = min_latency_chain(servers, 0, 30, {"a": 0.01, "b": 0.01, "c": 0.01, "big": 0.05}, no_compute)
    assert spans(chain) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_min_latency_uses_sub_ranges_and_compute_time():
    # "slow" covers everything but computes slowly; "fast" covers [5, 25): the best chain uses slow only at the edges.
    servers = [S("slow", 0, 30), S("fast", 5, 25)]
    compute = {"slow": 0.01, "fast": 0.001}
    chain = min_latency_chain(servers, 0, 30, {"slow": 0.001, "fast": 0.001}, lambda s: compute[s.peer_id])
    assert spans(chain) == [("slow", 0, 5), ("fast", 5, 25), ("slow", 25, 30)]
    # with a big per-hop latency the single slow server wins: 3 hops x 0.1 s > 20 blocks x 9 ms
    chain = min_latency_chain(servers, 0, 30, {"slow": 0.1, "fast": 0.1}, lambda s: compute[s.peer_id])
    assert spans(chain) == [("slow", 0, 30)]


def test_min_latency_sub_request_and_gap():
    servers = [S("a", 0, 10), S("b", 10, 20)]
    assert spans(min_latency_chain(servers, 3, 14, {}, no_compute)) == [("a", 3, 10), ("b", 10, 14)]
    assert min_latency_chain([S("a", 0, 10), S("c", 11, 20)], 0, 20, {}) is None
    with pytest.raises(ValueError):
        min_latency_chain(servers, 5, 5, {})


def test_min_latency_picks_lower_latency_of_same_span():
    servers = [S("a", 0, 10), S("b1", 10, 20), S("b2", 10, 20), S("c", 20, 30)]
    lat = {"a": 0.01, "b1": 0.05, "b2": 0.02, "c": 0.01}
    assert [h.peer_id for h in min_latency_chain(servers, 0, 30, lat)] == ["a", "b2", "c"]
    lat["b2"] = 0.5
    assert [h.peer_id for h in min_latency_chain(servers, 0, 30, lat)] == ["a", "b1", "c"]


def test_min_latency_block_time_from_throughput():
    # equal latency; "quick" announces 10x the throughput of "sluggish" over the same span
    servers = [S("sluggish", 0, 10, throughput=10.0), S("quick", 0, 10, throughput=100.0)]
    assert [h.peer_id for h in min_latency_chain(servers, 0, 10, {"sluggish": 0.01, "quick": 0.01})] == ["quick"]


# --- throughput_chain and split_batch -------------------------------------------------------------------------------


def test_throughput_chain_is_weighted_and_covers():
    servers = [S("a", 0, 15, 100.0), S("b", 0, 10, 300.0), S("c", 10, 30, 50.0), S("d", 15, 30, 50.0)]
    rng = random.Random(0)
    firsts = {"a": 0, "b": 0}
    for _ in range(2000):
        chain = throughput_chain(servers, 0, 30, rng)
        assert chain[0].start == 0 and chain[-1].end == 30
        assert all(x.end == y.start for x, y in itertools.pairwise(chain))
        assert all(h.server.covers(h.start, h.end) for h in chain)
        firsts[chain[0].peer_id] += 1
    assert 0.68 < firsts["b"] / 2000 < 0.82  # 300 / (300 + 100) = 0.75
    assert throughput_chain([S("a", 0, 10)], 0, 20, rng) is None


def test_split_batch_proportional():
    servers = [S("x", 0, 10, 300.0), S("y", 0, 10, 100.0)]
    parts = split_batch(8, servers)
    assert [(s.peer_id, lo, hi) for s, lo, hi in parts] == [("x", 0, 6), ("y", 6, 8)]
    parts = split_batch(3, servers, min_rows=2)  # too small to split in two
    assert [(s.peer_id, lo, hi) for s, lo, hi in parts] == [("x", 0, 3)]
    for batch in range(1, 40):
        parts = split_batch(batch, [*servers, S("z", 0, 10, 7.0)], min_rows=2)
        assert parts[0][1] == 0 and parts[-1][2] == batch
        assert all(p[2] == q[1] for p, q in itertools.pairwise(parts))
        assert all(hi - lo >= min(2, batch) for _, lo, hi in parts)


# --- bans and server lists ------------------------------------------------------------------------------------------


def test_bans_back_off_exponentially_and_expire():
    now = [0.0]
    bans = BanList(base=1.0, cap=5.0, clock=lambda: now[0])
    assert bans.ban("p") == 1.0 and bans.is_banned("p")
    now[0] = 1.0
    assert not bans.is_banned("p")
    assert bans.ban("p") == 2.0
    now[0] = 2.9
    assert bans.is_banned("p")
    assert bans.ban("p") == 4.0 and bans.ban("p") == 5.0  # capped
    bans.succeeded("p")
    assert not bans.is_banned("p") and bans.ban("p") == 1.0


def test_select_servers_applies_bans_and_lists():
    servers = [S("a", 0, 10), S("b", 0, 10), S("c", 0, 10)]
    bans = BanList()
    bans.ban("a")
    assert [s.peer_id for s in select_servers(servers, bans)] == ["b", "c"]
    assert [s.peer_id for s in select_servers(servers, bans, allowed=["a", "b"])] == ["b"]
    assert [s.peer_id for s in select_servers(servers, None, blocked=["b"])] == ["a", "c"]


def test_no_route_error_names_the_gap_and_the_swarm():
    servers = [S("peer-aaaaaa", 0, 10), S("peer-bbbbbb", 20, 30)]
    assert uncovered(servers, 0, 30) == [(10, 20)]
    err = no_route_error("tiny", 0, 30, servers, [*servers, S("peer-cccccc", 5, 25)])
    assert isinstance(err, PetalError) and err.code == "unavailable"
    assert "no servers cover blocks 10..20 of tiny" in err.message
    assert "[0, 10) on aaaaaa" in err.message and "1 of them banned" in err.message


# --- entries -> servers ---------------------------------------------------------------------------------------------


def record_value(start: int, end: int, *, state: str = "online", throughput: float = 50.0, **kw) -> dict:
    """A block-key value as servers write it (ServerRecord), quant and fingerprint included."""
    kw.setdefault("quant", "none")
    kw.setdefault("fingerprint", "F1")
    return ServerRecord(("/ip4/127.0.0.1/tcp/1",), start, end, state, throughput, 100, "float32", 1, **kw).to_value()


def test_entries_are_read_as_server_records_and_grouped_dropping_other_fingerprints():
    first = record_value(0, 10)
    second = {**record_value(10, 20, state="joining", throughput=20, quant="int8"), "a": ["/ip4/127.0.0.1/tcp/2"]}
    info = ServerInfo.from_record(ServerRecord.parse(first, "p1"))
    assert (info.start, info.end, info.throughput, info.fingerprint, info.cache_tokens_left) == (0, 10, 50.0, "F1", 100)
    assert ServerInfo.from_record(ServerRecord.parse(second, "p2")).addrs == ("/ip4/127.0.0.1/tcp/2",)
    assert ServerInfo.from_record(ServerRecord.parse(second, "p2")).quant == "int8"
    assert ServerRecord.parse({**first, "s": [5, 5]}, "p") is None
    assert ServerRecord.parse({**first, "s": [True, 3]}, "p") is None
    assert ServerRecord.parse({"s": [0, 3]}, "p") is None  # fields missing: skipped, not a crash
    assert ServerRecord.parse(["not", "a", "map"], "p") is None
    pairs = [("p1", first)] * 10 + [("p2", second)] * 10 + [("p3", record_value(0, 10, fingerprint="OTHER"))]
    pairs += [("p4", record_value(0, 10, state="offline")), ("p5", {"s": [0, 10]}), ("p6", "garbage")]
    grouped = group_servers(pairs, "F1")
    assert sorted(grouped) == ["p1", "p2"]
    assert grouped["p2"].state == "joining"


# --- SwarmView over a real DHT --------------------------------------------------------------------------------------


async def test_swarm_view_reads_servers_from_a_real_dht():
    from petal.daemon.dht.network import DHT
    from petal.daemon.identity import Identity

    ids = [Identity.generate() for _ in range(3)]
    nodes = [DHT(i, host="127.0.0.1", port=0, rpc_timeout=0.5) for i in ids]
    await nodes[0].start()
    for n in nodes[1:]:
        await n.start([("127.0.0.1", nodes[0].port)])
    try:
        model = "tiny-test"
        for k, (node, span, fp) in enumerate(zip(nodes[1:], [(0, 2), (2, 4)], ["FP", "FP"], strict=True)):
            addrs = (f"/ip4/127.0.0.1/tcp/{k + 1}",)
            value = ServerRecord(
                addrs, *span, "online", 10.0 * (k + 1), 64, "float32", 1, quant="none", fingerprint=fp
            ).to_value()
            await node.announce(MODELS_KEY, ModelRecord(model, fp, 4, "llama").to_value(), ttl=60)
            for b in range(*span):
                await node.announce(block_key(model, b), value, ttl=60)
        # a stranger announces a different model version under the same name: ignored (majority fingerprint)
        evil = ServerRecord((), 0, 4, "online", 1.0, 64, "float32", 1, fingerprint="EVIL").to_value()
        await nodes[0].announce(block_key(model, 0), evil, ttl=60)
        view = SwarmView(nodes[0], model)
        await view.refresh()
        assert view.fingerprint == "FP" and view.num_blocks == 4 and view.family == "llama"
        got = {s.peer_id: (s.start, s.end, s.throughput) for s in view.servers.values()}
        assert got == {ids[1].peer_id: (0, 2, 10.0), ids[2].peer_id: (2, 4, 20.0)}
        chain = min_latency_chain(view.servers.values(), 0, 4, {})
        assert [h.peer_id for h in chain] == [ids[1].peer_id, ids[2].peer_id]
        with pytest.raises(PetalError) as e:
            await SwarmView(nodes[0], "nope").refresh()
        assert e.value.code == "not_found" and "tiny-test" in e.value.message
    finally:
        for n in nodes:
            await n.stop()


class _ForgetfulDHT:
    """A DHT whose next `misses` reads come back empty, as when a lookup times out on a dead contact."""

    def __init__(self, entries: dict[str, list]) -> None:
        self.entries = entries
        self.misses = 0

    async def get(self, key: str) -> list:
        if self.misses:
            self.misses -= 1
            return []
        return self.entries.get(key, [])


async def test_one_empty_dht_read_is_retried_but_a_model_that_left_is_not_found():
    from petal.protocol.records import Entry

    def entry(value: dict) -> Entry:
        now = time.time()
        return Entry(peer_id="peerA", public_key=b"", value=value, issued_at=now, expires_at=now + 60)

    value = ServerRecord((), 0, 2, "online", 5.0, 64, "float32", 1, fingerprint="FP").to_value()
    dht = _ForgetfulDHT(
        {
            MODELS_KEY: [entry(ModelRecord("m", "FP", 2, "llama").to_value())],
            block_key("m", 0): [entry(value)],
            block_key("m", 1): [entry(value)],
        }
    )
    view = SwarmView(dht, "m")
    await view.refresh()
    assert set(view.servers) == {"peerA"}
    dht.misses = 1
    await view.refresh()
    assert set(view.servers) == {"peerA"}, "one transiently empty read must not fail a failover"
    dht.misses = 2
    with pytest.raises(PetalError) as e:
        await view.refresh()
    assert e.value.code == "not_found"


class _GatedDHT(_ForgetfulDHT):
    """Counts reads; while `open` is clear, reads wait for it (a slow DHT)."""

    def __init__(self, entries: dict[str, list]) -> None:
        super().__init__(entries)
        self.reads = 0
        self.open = asyncio.Event()
        self.open.set()

    async def get(self, key: str) -> list:
        self.reads += 1
        await self.open.wait()
        return await super().get(key)


async def test_a_stale_view_is_served_while_it_refreshes_in_the_background():
    from petal.daemon.routing.router import Router
    from petal.protocol.records import Entry

    now = time.time()
    record = ServerRecord((), 0, 2, "online", 5.0, 64, "float32", 1, fingerprint="FP").to_value()
    dht = _GatedDHT(
        {
            MODELS_KEY: [Entry("peerA", b"", ModelRecord("m", "FP", 2, "llama").to_value(), now, now + 60)],
            block_key("m", 0): [Entry("peerA", b"", record, now, now + 60)],
            block_key("m", 1): [Entry("peerA", b"", record, now, now + 60)],
        }
    )
    router = Router(None, dht, period=30.0, max_age=0.05)  # type: ignore[arg-type]  # views read only the DHT
    try:
        view = await router.view("m")
        reads, updated = dht.reads, view.updated_at
        assert await router.view("m") is view and dht.reads == reads  # young: no read at all
        await asyncio.sleep(0.1)
        dht.open.clear()  # reads now hang: a call that waited for them would time out below
        assert await asyncio.wait_for(router.view("m"), 1.0) is view  # stale: served as it is...
        assert await asyncio.wait_for(router.view("m"), 1.0) is view
        assert dht.reads == reads + 1  # ...while ONE refresh runs in the background
        dht.open.set()
        for _ in range(100):  # bounded: until the background refresh lands
            if view.updated_at != updated:
                break
            await asyncio.sleep(0.01)
        assert view.updated_at is not None and updated is not None and view.updated_at > updated
        router.max_stale = 0.05  # older than max_stale: the call waits for its refresh
        await asyncio.sleep(0.1)
        reads = dht.reads
        await router.view("m")
        assert dht.reads > reads and not view.stale(0.05)
    finally:
        await router.close()
