"""Real petald processes on loopback: time from start to READY=1, and DHT get latency through the control socket.

    .venv/bin/python tests/benchmarks/bench_swarm.py --daemons 5 20 --gets 50

`get` latency is measured two ways: through a daemon's socket (HTTP + DHT lookup), and with an in-process DHT node
joined to the same swarm (the DHT lookup alone), so the socket overhead is visible as the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from tests.support.daemons import Swarm


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def dht_gets(port: int, key: str, n: int) -> list[float]:
    node = DHT(Identity.generate())
    await node.start([("127.0.0.1", port)])
    try:
        await node.get(key)  # warm the routing table
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await node.get(key)
            out.append((time.perf_counter() - t0) * 1000)
        return out
    finally:
        await node.stop()


def run(n: int, gets: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="petal-bench-", dir="/tmp"))
    swarm = Swarm(root)
    try:
        t0 = time.perf_counter()
        boot = swarm.start_bootstrap("d0")
        ready = [time.perf_counter() - t0]
        for i in range(1, n):
            t0 = time.perf_counter()
            swarm.join(f"d{i}", boot)
            ready.append(time.perf_counter() - t0)
        key = "bench-model.0"
        for d in swarm.daemons[1:4]:
            d.client.request("PUT", f"/v1/dht/{key}", {"value": {"t": 1.0}})
        reader = swarm.daemons[-1]
        socket_ms = []
        for _ in range(gets):
            t0 = time.perf_counter()
            assert len(reader.client.get(f"/v1/dht/{key}")["entries"]) == 3
            socket_ms.append((time.perf_counter() - t0) * 1000)
        dht_ms = asyncio.run(dht_gets(boot.status()["dht_port"], key, gets))
        return {
            "ready_median_s": statistics.median(ready),
            "ready_max_s": max(ready),
            "socket_get_median_ms": statistics.median(socket_ms),
            "socket_get_p90_ms": pct(socket_ms, 0.9),
            "dht_get_median_ms": statistics.median(dht_ms),
            "dht_get_p90_ms": pct(dht_ms, 0.9),
        }
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemons", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--gets", type=int, default=50)
    args = ap.parse_args()
    print("| daemons | start→READY median s | max s | get via socket median ms | p90 ms | DHT get median ms | p90 ms |")
    print("|---|---|---|---|---|---|---|")
    for n in args.daemons:
        r = run(n, args.gets)
        print(
            f"| {n} | {r['ready_median_s']:.2f} | {r['ready_max_s']:.2f} | {r['socket_get_median_ms']:.1f} | "
            f"{r['socket_get_p90_ms']:.1f} | {r['dht_get_median_ms']:.1f} | {r['dht_get_p90_ms']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
