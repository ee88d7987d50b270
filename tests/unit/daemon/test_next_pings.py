"""Next pings (Petals' ``next_pings``): the optional record field, and route choice with server-to-server links."""

from __future__ import annotations

import pytest

from petal.daemon.routing.chains import min_latency_chain
from petal.daemon.routing.swarm import ServerInfo
from petal.protocol.records import MAX_NEXT_PINGS, RecordError, ServerRecord, check_announcement

BASE = dict(addrs=("/ip4/10.0.0.1/tcp/31330",), start=0, end=10, state="online", throughput=100.0,
            cache_tokens_left=1000, dtype="float32", version=1)  # fmt: skip
B1 = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB1xx"
B2 = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2yy"


def test_record_carries_next_pings_by_id_suffix_and_old_records_still_read():
    value = ServerRecord(**BASE, next_pings=((B1, 101.26), (B2, 2.0))).to_value()
    assert value["np"] == {B1[-8:]: 101.3, B2[-8:]: 2.0}
    record = ServerRecord.from_value(value, "X")
    info = ServerInfo.from_record(record)
    assert info.ping_to(B1) == pytest.approx(0.1013) and info.ping_to(B2) == pytest.approx(0.002)
    assert info.ping_to("someone-else") is None
    check_announcement("smollm2.29", value)  # still fits one DHT entry
    plain = ServerRecord(**BASE).to_value()
    assert "np" not in plain and ServerRecord.from_value(plain).next_pings == ()


@pytest.mark.parametrize(
    "np",
    [
        [1, 2],
        {f"peer{i}": 1.0 for i in range(MAX_NEXT_PINGS + 1)},
        {"x" * 9: 1.0},
        {"abc": -1},
        {"abc": float("nan")},
        {"abc": True},
        {"abc": "1"},
    ],
)
def test_malformed_next_pings_are_refused(np):
    value = {**ServerRecord(**BASE).to_value(), "np": np}
    with pytest.raises(RecordError, match="next ping"):
        ServerRecord.from_value(value)


def server(peer: str, start: int, end: int, pings: dict[str, float] | None = None) -> ServerInfo:
    return ServerInfo(peer, start, end, throughput=1000.0, next_pings=tuple((pings or {}).items()))


def test_route_avoids_a_slow_server_to_server_link():
    # A pushes to B1 over a 100 ms link, to B2 over 2 ms; the client sees B1 a little faster than B2.
    servers = [server("A", 0, 10, {"B1": 100.0, "B2": 2.0}), server("B1", 10, 20), server("B2", 10, 20)]
    client = {"A": 0.005, "B1": 0.004, "B2": 0.006}
    plain = min_latency_chain(servers, 0, 20, client)
    assert [h.peer_id for h in plain] == ["A", "B1"]  # client latencies alone pick the slow pushed link
    linked = min_latency_chain(servers, 0, 20, client, link=lambda a, b: a.ping_to(b.peer_id))
    assert [(h.peer_id, h.start, h.end) for h in linked] == [("A", 0, 10), ("B2", 10, 20)]


def test_unknown_links_give_the_same_route_as_client_latencies():
    servers = [server("A", 0, 12), server("C", 0, 8), server("B1", 8, 20), server("B2", 12, 20)]
    client = {"A": 0.01, "C": 0.002, "B1": 0.03, "B2": 0.004}
    plain = min_latency_chain(servers, 0, 20, client)
    linked = min_latency_chain(servers, 0, 20, client, link=lambda a, b: None)
    assert [(h.peer_id, h.start, h.end) for h in linked] == [(h.peer_id, h.start, h.end) for h in plain]
    assert min_latency_chain(servers, 0, 20, client, link=lambda a, b: None) is not None
    assert min_latency_chain([server("A", 0, 5)], 0, 20, client, link=lambda a, b: 0.0) is None


async def test_server_measures_and_announces_round_trips_to_the_next_span():
    from tests.support.swarms import LocalSwarm
    from tests.support.tinymodels import tiny_llama

    swarm = LocalSwarm(tiny_llama())
    await swarm.start()
    try:
        a = await swarm.add(0, 3)
        b1, b2 = await swarm.add(3, 6), await swarm.add(3, 6)
        await swarm.add(0, 6)  # covers block 3 too: also a next server of A
        server, _, dht = swarm.servers[a]
        server._dht = dht  # LocalSwarm's servers have no DHT handle of their own
        pings = await server.measure_next_pings()
        assert {b1, b2} <= set(pings) and a not in pings and len(pings) == 3
        assert all(0 <= ms < 5000 for ms in pings.values())
        server.next_pings = pings
        record = ServerRecord.from_value(server.record("online"))
        assert ServerInfo.from_record(record).ping_to(b1) == pytest.approx(pings[b1] / 1000)
    finally:
        await swarm.close()
