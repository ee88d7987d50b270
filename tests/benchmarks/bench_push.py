"""Decode step latency with server-to-server push on and off: three real petald daemons on loopback.

Each daemon serves a third of the model's blocks; the client (router + InferenceSession on its own libp2p transport
and DHT node) runs decode steps of one token, alternating push on / push off rounds so load drift hits both alike.
Prints the median and p90 step latency and the bytes per step: what the client sends and receives (measured on its
streams) and what the servers push to each other (the push frames' size, computed).

    .venv/bin/python tests/benchmarks/bench_push.py                       # tiny random 30-block Llama
    .venv/bin/python tests/benchmarks/bench_push.py --model /path/to/SmolLM2-135M --codec q8
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

import torch

from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.routing.router import Router
from petal.daemon.routing.session import InferenceSession
from petal.protocol.frames import encode_frame
from petal.protocol.tensors import encode_tensor
from tests.support.daemons import Swarm


class DelayedStream:
    """A stream whose messages each way arrive `delay` seconds late, without blocking the caller (send returns at
    once, order kept): the latency of a client far from servers that sit close to each other."""

    def __init__(self, inner: object, delay: float, counter: Counted) -> None:
        self.inner, self.delay, self.counter = inner, delay, counter
        self.peer_id, self.protocol_id = inner.peer_id, inner.protocol_id  # type: ignore[attr-defined]
        self._out: asyncio.Queue[tuple[float, object]] = asyncio.Queue()
        self._in: asyncio.Queue[tuple[float, object, BaseException | None]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._sender()), asyncio.create_task(self._pump())]

    async def _sender(self) -> None:
        while True:
            due, message = await self._out.get()
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if message is None:
                await self.inner.close()  # type: ignore[attr-defined]
                return
            await self.inner.send(message)  # type: ignore[attr-defined]

    async def _pump(self) -> None:
        while True:
            try:
                message = await self.inner.recv()  # type: ignore[attr-defined]
            except BaseException as e:  # noqa: BLE001 - handed to the reader in order
                self._in.put_nowait((time.perf_counter() + self.delay, None, e))
                return
            self._in.put_nowait((time.perf_counter() + self.delay, message, None))

    async def send(self, message: object) -> None:
        self.counter.sent += len(encode_frame(message))
        self._out.put_nowait((time.perf_counter() + self.delay, message))

    async def recv(self, timeout: float | None = None) -> object:
        due, message, error = await asyncio.wait_for(self._in.get(), timeout)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if error is not None:
            self._in.put_nowait((due, None, error))
            raise error
        self.counter.received += len(encode_frame(message))
        return message

    async def close(self) -> None:
        self._out.put_nowait((time.perf_counter() + self.delay, None))

    async def reset(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.inner.reset()  # type: ignore[attr-defined]

    async def __aenter__(self) -> DelayedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await (self.close() if exc[0] is None else self.reset())


class Counted:
    """Wraps every stream the client opens: counts frame bytes each way and adds `delay` seconds each way."""

    def __init__(self, transport: Libp2pTransport) -> None:
        self.sent = self.received = 0
        self.delay = 0.0
        inner = transport.open_stream

        async def open_stream(*args, **kwargs):
            return DelayedStream(await inner(*args, **kwargs), self.delay, self)

        transport.open_stream = open_stream  # type: ignore[method-assign]


def tiny_model_dir(root: Path) -> Path:
    from tests.support.tinymodels import tiny_llama

    path = root / "tiny-llama"
    tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64).save_pretrained(path)
    return path


async def run(args: argparse.Namespace, root: Path) -> None:
    import json

    model_dir = Path(args.model) if args.model else tiny_model_dir(root)
    config = json.loads((model_dir / "config.json").read_text())
    blocks, hidden = config["num_hidden_layers"], config["hidden_size"]
    cuts = [0, blocks // 3, 2 * blocks // 3, blocks]
    swarm = Swarm(root)
    env = {"OMP_NUM_THREADS": str(args.threads)}
    try:
        t0 = time.monotonic()
        serve = ("--serve", str(model_dir))
        boot = swarm.make("s0", "--new-swarm", *serve, "--blocks", f"{cuts[0]}:{cuts[1]}").start(env)
        for i in (1, 2):
            swarm.make(f"s{i}", "--initial-peer", boot.address, *serve, "--blocks", f"{cuts[i]}:{cuts[i + 1]}").start(
                env
            )
        print(
            f"3 daemons serving {model_dir.name} ({blocks} blocks, hidden {hidden}) up in "
            f"{time.monotonic() - t0:.1f} s; codec {args.codec}, {args.steps} steps x {args.rounds} rounds per mode"
        )
        ident = Identity.generate()
        transport = Libp2pTransport(ident)
        await transport.start()
        counted = Counted(transport)
        dht = DHT(ident, host="127.0.0.1", port=0)
        await dht.start([("127.0.0.1", boot.status()["dht_port"])])
        router = Router(transport, dht, max_age=0.0, max_stale=0.0)
        push_frame = len(
            encode_frame(
                {"session": "0" * 32, "step": 1 << 20, "hidden": encode_tensor(torch.randn(1, 1, hidden), args.codec)}
            )
        )
        try:
            for delay_ms in args.client_delay_ms:
                counted.delay = delay_ms / 1e3
                await measure(args, router, counted, model_dir.name, hidden, push_frame, delay_ms)
        finally:
            await router.close()
            await dht.stop()
            await transport.stop()
    finally:
        swarm.close()


async def measure(
    args: argparse.Namespace,
    router: Router,
    counted: Counted,
    model: str,
    hidden: int,
    push_frame: int,
    delay_ms: float,
) -> None:
    times: dict[bool, list[float]] = {True: [], False: []}
    per_step: dict[bool, tuple[float, float]] = {}
    pushes: dict[bool, int] = {True: 0, False: 0}
    for _ in range(args.rounds):
        for push in (True, False):
            max_length = args.prefill + args.steps + 1
            async with InferenceSession(router, model, max_length=max_length, codec=args.codec, push=push) as s:
                if len(s.chain) != 3:
                    raise SystemExit(f"expected a 3-hop chain, got {s.chain}")
                await s.step(torch.randn(1, args.prefill, hidden))
                sent0, recv0 = counted.sent, counted.received
                for _ in range(args.steps):
                    x = torch.randn(1, 1, hidden)
                    t = time.perf_counter()
                    await s.step(x)
                    times[push].append(time.perf_counter() - t)
                per_step[push] = ((counted.sent - sent0) / args.steps, (counted.received - recv0) / args.steps)
                pushes[push] += s.pushes
    print(f"client <-> server one-way delay added: {delay_ms:g} ms (servers among themselves: loopback)")
    for push in (True, False):
        ts = sorted(times[push])
        sent, received = per_step[push]
        between = 2 * push_frame if push else 0
        print(
            f"  push {'on ' if push else 'off'}: step median {statistics.median(ts) * 1e3:7.2f} ms   "
            f"p90 {ts[int(0.9 * len(ts))] * 1e3:7.2f} ms   client sends {sent:5.0f} B, receives "
            f"{received:5.0f} B; servers push {between:4d} B per step ({pushes[push]} pushes)"
        )
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"  push saves {(off - on) * 1e3:.2f} ms per step ({(1 - on / off) * 100:.0f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model dir (default: a tiny random 30-block Llama)")
    parser.add_argument("--codec", default="q8", choices=["none", "q8", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per daemon")
    parser.add_argument(
        "--client-delay-ms",
        type=float,
        nargs="+",
        default=[0.0, 10.0],
        help="one-way delay added to the client's streams (emulates a client far from the servers)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="petal-bp-", dir="/tmp"))
    try:
        asyncio.run(run(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
