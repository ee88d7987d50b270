"""DHT get latency on loopback: swarms of 5 and 20 nodes, and 10 nodes with one dead peer.

Run: .venv/bin/python tests/benchmarks/bench_dht.py [--rounds 50] [--rpc-timeout 1.0]

All nodes run in one process and one event loop (as in tests/test_dht.py), so figures measure the
protocol's round trips and CPU (signature checks, msgpack), not network latency.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.protocol.records import ServerRecord, block_key

KEY = block_key("HuggingFaceTB/SmolLM2-135M", 7)


def _value(identity: Identity) -> dict:
    addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}"
    return ServerRecord((addr,), 0, 30, "online", 100.0, 4096, "bfloat16", 1).to_value()


async def _swarm(n: int, rpc_timeout: float) -> list[DHT]:
    nodes = [DHT(Identity.generate(), rpc_timeout=rpc_timeout) for _ in range(n)]
    await nodes[0].start()
    for node in nodes[1:]:
        await node.start([("127.0.0.1", nodes[0].port)])
    for node in nodes[:3]:
        await node.announce(KEY, _value(node.identity), ttl=600)
    return nodes


async def _time_get(node: DHT, expect: int) -> float:
    t = time.perf_counter()
    entries = await node.get(KEY)
    elapsed = time.perf_counter() - t
    assert len(entries) == expect, f"expected {expect} entries, got {len(entries)}"
    return elapsed


def _row(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"| {name:<40} | {len(ms):>4} | {statistics.median(ms):>9.2f} | {p90:>8.2f} | {ms[-1]:>8.2f} |"


async def main(rounds: int, rpc_timeout: float) -> None:
    rows = []
    for n in (5, 20):
        nodes = await _swarm(n, rpc_timeout)
        try:
            samples = [await _time_get(nodes[i % n], 3) for i in range(rounds)]
            rows.append(_row(f"{n} nodes, all alive", samples))
        finally:
            for node in nodes:
                await node.stop()

    # 10 nodes, one dies: the first get from each asker pays one rpc_timeout, later gets skip the peer
    first, later = [], []
    for _ in range(max(3, rounds // 10)):
        nodes = await _swarm(10, rpc_timeout)
        try:
            await nodes[5].stop()
            for asker in nodes[6:]:
                first.append(await _time_get(asker, 3))
                later.extend([await _time_get(asker, 3) for _ in range(3)])
        finally:
            for node in nodes:
                await node.stop()
    rows.append(_row("10 nodes, 1 dead: first get per node", first))
    rows.append(_row("10 nodes, 1 dead: later gets", later))

    print(f"DHT get latency, 3 entries per key, rpc_timeout={rpc_timeout}s, loopback, one process")
    print("| case                                     |    n | median ms |   p90 ms |   max ms |")
    print("|------------------------------------------|------|-----------|----------|----------|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--rpc-timeout", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(args.rounds, args.rpc_timeout))
