"""Block server overhead: one BlockServer on a real Libp2pTransport (loopback), a client RemoteSpan in the same process.

Prints decode steps/s and forward tokens/s through the server (codec none and q8) against the same span run locally,
so the difference is the wire: validation, codec, msgpack, libp2p, the compute thread hop.

    .venv/bin/python tests/benchmarks/bench_server.py [MODEL_DIR_OR_NAME] [--blocks A:B] [--steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import PeerAddr
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.placement import parse_blocks
from petal.daemon.serving.plan import resolve_model_dir
from petal.daemon.serving.settings import ServeSettings
from petal.kernels.store import load_span, open_model


def local_figures(span, hidden_size: int, steps: int, fwd_tokens: int) -> tuple[float, float]:
    cache = span.new_cache(1, steps + 8, torch.float32, "cpu")
    x = torch.randn(1, 1, hidden_size)
    with torch.no_grad():
        span.step(x, cache)
        t0 = time.perf_counter()
        for _ in range(steps):
            span.step(x, cache)
        decode = steps / (time.perf_counter() - t0)
        h = torch.randn(1, fwd_tokens, hidden_size)
        span.forward(h)
        t0 = time.perf_counter()
        for _ in range(3):
            span.forward(h)
        forward = 3 * fwd_tokens / (time.perf_counter() - t0)
    return decode, forward


async def remote_figures(remote: RemoteSpan, hidden_size: int, steps: int, fwd_tokens: int) -> tuple[float, float]:
    x = torch.randn(1, 1, hidden_size)
    async with await remote.open_inference(steps + 8, 1) as session:
        await session.step(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            await session.step(x)
        decode = steps / (time.perf_counter() - t0)
    h = torch.randn(1, fwd_tokens, hidden_size)
    await remote.forward(h)
    t0 = time.perf_counter()
    for _ in range(3):
        await remote.forward(h)
    forward = 3 * fwd_tokens / (time.perf_counter() - t0)
    return decode, forward


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--blocks", default="0:10")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    info = open_model(resolve_model_dir(args.model))
    start, end = parse_blocks(args.blocks, info.num_blocks)
    span = load_span(info, start, end)
    hidden = span.hidden_size
    print(f"model {info.name}, blocks [{start}, {end}), hidden {hidden}, torch threads {torch.get_num_threads()}")
    local_figures(span, hidden, args.steps // 4, args.tokens)  # warm-up: the first passes are several times slower
    decode, forward = local_figures(span, hidden, args.steps, args.tokens)
    print(f"local (same process, no server):  decode {decode:8.1f} steps/s   forward {forward:8.1f} tokens/s")

    server_t = Libp2pTransport(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"])
    client_t = Libp2pTransport(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"])
    await server_t.start()
    await client_t.start()
    server = BlockServer(
        span,
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=info.num_blocks,
        transport=server_t,
        settings=ServeSettings(
            max_length=max(args.steps + 64, args.tokens),
            max_batch=4,
            max_cache_tokens=(end - start) * (args.steps + 64),
        ),
    )
    await server.start()
    try:
        peer = PeerAddr(server_t.peer_id, tuple(server_t.listen_addrs))
        for codec in ("none", "q8"):
            remote = RemoteSpan(client_t, peer, info.name, info.fingerprint, start, end, codec)
            r_decode, r_forward = await remote_figures(remote, hidden, args.steps, args.tokens)
            overhead_ms = (1 / r_decode - 1 / decode) * 1e3
            print(
                f"via server, codec {codec:<4}:         decode {r_decode:8.1f} steps/s   forward {r_forward:8.1f} "
                f"tokens/s   per-step overhead {overhead_ms:.2f} ms"
            )
        decode2, forward2 = local_figures(span, hidden, args.steps, args.tokens)
        print(f"local again (load drift check):  decode {decode2:8.1f} steps/s   forward {forward2:8.1f} tokens/s")
    finally:
        await server.stop()
        await client_t.stop()
        await server_t.stop()


if __name__ == "__main__":
    asyncio.run(main())
