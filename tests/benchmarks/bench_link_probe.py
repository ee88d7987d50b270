"""What the `auto` codec's bandwidth probe reads on a link, and how often one sample would misjudge it.

    .venv/bin/python tests/benchmarks/bench_link_probe.py [--samples 40] [--threshold 100]

One real petald serves SmolLM2 block 0 on loopback; a client transport, DHT node and router run in this process.
Each sample is what `Router.probe` does for a server not on this host: an `info` round trip, then the same request
padded with `BANDWIDTH_PROBE_BYTES`, whose extra time gives the upload bandwidth. (The router itself never measures
loopback servers: they are on this host. This measures anyway, to show what the probe reads and how noisy one
sample is.) Prints the round trip, the samples' median and minimum, and how many single samples, and how many
best-of-4 windows (the router's estimate), fall below the threshold.
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

from petal.daemon.pull import pull_model
from petal.daemon.routing.router import BANDWIDTH_PROBE_BYTES, BANDWIDTH_SAMPLES
from petal.protocol.messages import INFO_PROTOCOL
from tests.support.daemons import Daemon, Swarm
from tests.support.swarms import Client

MODEL = "smollm2"


async def measure(server_daemon: Daemon, samples: int, threshold: float) -> None:
    client = await Client().start(server_daemon.status()["dht_port"])
    try:
        router = client.router
        view = await router.view(MODEL, fresh=True)
        (server,) = view.servers.values()
        await client.transport.call(server.peer, INFO_PROTOCOL, {"model": MODEL}, timeout=10)  # dial first
        round_trips, mbits = [], []
        for _ in range(samples):
            t0 = time.perf_counter()
            await client.transport.call(server.peer, INFO_PROTOCOL, {"model": MODEL}, timeout=10)
            rt = time.perf_counter() - t0
            bits = await router.measure_bandwidth(MODEL, server, rt)
            assert bits is not None
            round_trips.append(rt)
            mbits.append(bits / 1e6)
        windows = [max(mbits[i : i + BANDWIDTH_SAMPLES]) for i in range(len(mbits) - BANDWIDTH_SAMPLES + 1)]
        print(
            f"info round trip: median {1000 * statistics.median(round_trips):.2f} ms; "
            f"padded probe ({BANDWIDTH_PROBE_BYTES // 1024} KiB), single samples: median "
            f"{statistics.median(mbits):.0f} Mbit/s, min {min(mbits):.0f}, {sum(m < threshold for m in mbits)}/"
            f"{len(mbits)} below {threshold:g}; best of {BANDWIDTH_SAMPLES}: min {min(windows):.0f} Mbit/s, "
            f"{sum(m < threshold for m in windows)}/{len(windows)} below {threshold:g}"
        )
    finally:
        await client.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--threshold", type=float, default=100.0, help="Mbit/s (petald --slow-link-mbit)")
    args = ap.parse_args()
    model_dir = pull_model(MODEL, progress=False)
    root = Path(tempfile.mkdtemp(prefix="petal-bw-", dir="/tmp"))
    swarm = Swarm(root)
    try:
        env = {"PETAL_MODELS_DIR": str(model_dir.parent), "OMP_NUM_THREADS": "1"}
        server = swarm.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:1").start(env)
        asyncio.run(measure(server, args.samples, args.threshold))
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
