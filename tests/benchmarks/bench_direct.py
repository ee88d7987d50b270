"""The direct data plane (TLS/TCP on the asyncio loop) against libp2p (Noise + yamux in a trio thread), same run.

    .venv/bin/python tests/benchmarks/bench_direct.py [--runs 300] [--model DIR] [--steps 30] [--rounds 3]

1. Round trips on one long-lived stream (64 B, 16 KiB) and `call()` (a fresh stream per request, 64 B) between two
   transports in this process: `DirectTransport` vs `Libp2pTransport`, interleaved in blocks of 50.
2. A decode step (one token's hidden state through the whole model, codec none) through 3 servers + a client
   daemon, real petald processes: one swarm with `--direct` everywhere, one without, interleaved rounds. The
   model is a tiny random 30-block Llama unless --model names a model dir (e.g. SmolLM2-135M's). Every daemon
   runs with OMP_NUM_THREADS=--threads.
Prints medians (and p90 for round trips).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.ctl.client import Client
from petal.daemon.identity import Identity
from petal.daemon.net.direct import DirectTransport
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import PeerAddr, StreamClosed, Transport
from tests.support.daemons import Swarm, wait_for_route
from tests.support.tinymodels import tiny_llama

ECHO = "/petal/block/bench-echo/1"
SIZES = {"64 B": 64, "16 KiB": 16 * 1024}


async def echo(stream) -> None:
    while True:
        try:
            m = await stream.recv()
        except StreamClosed:
            return
        await stream.send(m)


def fmt(samples: list[float]) -> str:
    s = sorted(samples)
    return f"{statistics.median(s) * 1e3:7.3f} / {s[int(0.9 * (len(s) - 1))] * 1e3:7.3f}"


async def roundtrips(runs: int) -> None:
    pairs: dict[str, tuple[Transport, Transport]] = {
        "direct": (DirectTransport(Identity.generate()), DirectTransport(Identity.generate())),
        "libp2p": (Libp2pTransport(Identity.generate()), Libp2pTransport(Identity.generate())),
    }
    for _, b in pairs.values():
        b.set_handler(ECHO, echo)
    await asyncio.gather(*(t.start() for pair in pairs.values() for t in pair))
    try:
        streams = {}
        for name, (a, b) in pairs.items():
            peer = PeerAddr(b.peer_id, tuple(b.listen_addrs))
            streams[name] = (a, peer, await a.open_stream(peer, ECHO))
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(5):  # warm up
            for a, peer, stream in streams.values():
                await stream.send(b"x")
                await stream.recv()
                await a.call(peer, ECHO, b"x")
        for block in range(max(1, runs // 50)):
            for name, (a, peer, stream) in streams.items():
                for label, size in SIZES.items():
                    payload = b"x" * size
                    for _ in range(50):
                        t0 = time.perf_counter()
                        await stream.send(payload)
                        await stream.recv()
                        samples.setdefault((name, label), []).append(time.perf_counter() - t0)
                for _ in range(50 if block < 2 else 0):  # call(): 100 is plenty
                    t0 = time.perf_counter()
                    await a.call(peer, ECHO, b"x" * 64)
                    samples.setdefault((name, "call 64 B"), []).append(time.perf_counter() - t0)
        print("round trip, median / p90 ms (n)")
        for label in (*SIZES, "call 64 B"):
            line = "   ".join(f"{n}: {fmt(samples[(n, label)])} ({len(samples[(n, label)])})" for n in streams)
            print(f"  {label:10s} {line}")
        for _, _, stream in streams.values():
            await stream.close()
    finally:
        await asyncio.gather(*(t.stop() for pair in pairs.values() for t in pair))


class Daemons:
    def __init__(self, name: str, path: Path, n: int, hidden: int, direct: bool, threads: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"petal-{name}-", dir="/tmp"))  # AF_UNIX paths <= 108 bytes
        self.swarm = Swarm(self.root)
        self.hidden = hidden
        env = {"OMP_NUM_THREADS": str(threads), "PETAL_MODELS_DIR": str(path.parent)}
        extra = ("--direct", "127.0.0.1:0") if direct else ()
        cuts = [(n * i // 3, n * (i + 1) // 3) for i in range(3)]
        try:
            serve = ("--serve", str(path), *extra)
            boot = self.swarm.make("s0", "--new-swarm", *serve, "--blocks", f"{cuts[0][0]}:{cuts[0][1]}").start(env)
            for i, (a, b) in enumerate(cuts[1:], 1):
                self.swarm.make(f"s{i}", "--initial-peer", boot.address, *serve, "--blocks", f"{a}:{b}").start(env)
            client = self.swarm.make("c", "--initial-peer", boot.address, *extra).start(env)
            wait_for_route(client, path.name, n)
            self.client = Client(client.socket, timeout=120)
        except BaseException:
            self.close()
            raise

    def decode(self, model: str, steps: int) -> list[float]:
        torch.manual_seed(0)
        times = []
        with self.client.open_session(model, max_length=steps + 8, codec="none") as s:
            s.step(torch.randn(1, 4, self.hidden))
            for _ in range(steps):
                h = torch.randn(1, 1, self.hidden)
                t0 = time.perf_counter()
                s.step(h)
                times.append(time.perf_counter() - t0)
        return times

    def close(self) -> None:
        self.swarm.close()
        shutil.rmtree(self.root, ignore_errors=True)


def decode_steps(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="petal-bd-", dir="/tmp"))
    try:
        if args.model:
            path = Path(args.model).expanduser()
        else:
            path = tmp / "tiny-llama"
            tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64).save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        n, hidden = config["num_hidden_layers"], config["hidden_size"]
        swarms = {}
        try:
            for name, direct in (("direct", True), ("libp2p", False)):
                swarms[name] = Daemons(name, path, n, hidden, direct, args.threads)
            per: dict[str, list[float]] = {name: [] for name in swarms}
            rounds: dict[str, list[str]] = {name: [] for name in swarms}
            for r in range(args.rounds):
                for name, d in sorted(swarms.items(), reverse=r % 2 == 1):  # alternate which swarm goes first
                    times = d.decode(path.name, args.steps)
                    per[name] += times
                    rounds[name].append(f"{statistics.median(times) * 1e3:.1f}")
            print(f"decode step through 3 servers + client daemon ({path.name}, {n} blocks), median ms (n)")
            for name, times in per.items():
                median = statistics.median(times) * 1e3
                print(f"  {name:7s} {median:8.2f} ({len(times)})   rounds: {' '.join(rounds[name])}")
            for name, d in swarms.items():
                warnings = sum(dm.log().count(" WARNING ") for dm in d.swarm.daemons) if args.verbose else 0
                if warnings:
                    print(f"  {name}: {warnings} warnings in the daemons' logs under {d.root}")
        finally:
            for d in swarms.values():
                d.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300, help="round trips per size and transport")
    ap.add_argument("--model", help="model dir [a tiny random 30-block Llama]")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="count warnings in the daemons' logs")
    ap.add_argument("--skip-swarm", action="store_true", help="round trips only")
    args = ap.parse_args()
    asyncio.run(roundtrips(args.runs))
    if not args.skip_swarm:
        decode_steps(args)


if __name__ == "__main__":
    main()
