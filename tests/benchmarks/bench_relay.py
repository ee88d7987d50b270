"""Direct vs relayed (circuit relay v2) round trips and throughput between Libp2pTransports on 127.0.0.1.

`python tests/benchmarks/bench_relay.py [--runs N] [--mb M]` prints medians; three transports in one process
(relay, private, dialer), so the relay's copying competes for the same cores as both ends.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from petal.daemon.identity import Identity
from petal.daemon.net.addrs import is_circuit
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import PeerAddr, StreamClosed

ECHO = "/bench/echo/1"


async def echo(stream) -> None:
    while True:
        try:
            await stream.send(await stream.recv())
        except StreamClosed:
            return


async def measure(dialer: Libp2pTransport, peer: PeerAddr, runs: int, mb: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    stream = await dialer.open_stream(peer, ECHO)
    out["first open ms"] = (time.perf_counter() - t0) * 1e3
    for size in (64, 16 * 1024):
        payload = b"x" * size
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            await stream.send(payload)
            await stream.recv(timeout=30)
            times.append((time.perf_counter() - t) * 1e3)
        out[f"{size} B rtt ms"] = statistics.median(times)
    blob = b"y" * (1 << 20)
    t = time.perf_counter()
    for _ in range(mb):
        await stream.send(blob)
        await stream.recv(timeout=60)
    out["1 MiB echo MB/s"] = 2 * mb / (time.perf_counter() - t)  # both directions counted
    await stream.close()
    return out


async def main(runs: int, mb: int) -> None:
    relay = Libp2pTransport(Identity.generate(), relay_service=True)
    # DCUtR off: on loopback it would upgrade the relayed connection to a direct one mid-measurement
    private, dialer = (Libp2pTransport(Identity.generate(), upgrade_relayed=False) for _ in range(2))
    private.set_handler(ECHO, echo)
    nodes = (relay, private, dialer)
    await asyncio.gather(*(t.start() for t in nodes))
    try:
        t0 = time.perf_counter()
        circuit = await private.use_relay(PeerAddr(relay.peer_id, tuple(relay.listen_addrs)))
        print(f"use_relay (connect + reserve): {(time.perf_counter() - t0) * 1e3:.1f} ms")
        relayed = await measure(dialer, PeerAddr(private.peer_id, (circuit,)), runs, mb)
        other = Libp2pTransport(Identity.generate())  # a fresh dialer for the direct path (one connection per peer)
        await other.start()
        try:
            direct = await measure(
                other, PeerAddr(private.peer_id, tuple(a for a in private.listen_addrs if not is_circuit(a))), runs, mb
            )
        finally:
            await other.stop()
        print(f"{'':18} {'direct':>10} {'relayed':>10}")
        for key in direct:
            print(f"{key:18} {direct[key]:10.2f} {relayed[key]:10.2f}")
    finally:
        await asyncio.gather(*(t.stop() for t in nodes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--mb", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.mb))
