"""Transport figures on loopback: what the asyncio<->trio bridge costs on top of libp2p, and libp2p on top of TCP.

    .venv/bin/python tests/benchmarks/bench_transport.py [--runs 200] [--mb 64]

Three paths, all with the same length-prefixed msgpack frames (petal.protocol.frames), one long-lived stream:
  bridge   two Libp2pTransports (each its own trio thread) driven from asyncio: what the daemon gets
  libp2p   two py-libp2p hosts inside one trio.run, no bridge
  tcp      asyncio streams over plain TCP (no noise, no yamux)
Round trip = send one message, receive the echo. Throughput = one-way stream of 1 MiB messages, acked at the end.
Also: `call()` (a fresh stream per request) through the bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport, build_host
from petal.daemon.net.transport import PeerAddr, StreamClosed
from petal.protocol.frames import FrameDecoder, encode_frame

SIZES = {"64 B": 64, "16 KiB": 16 * 1024, "1 MiB": 1024 * 1024}
ECHO, SINK = "/bench/echo/1", "/bench/sink/1"
MiB = 1024 * 1024


def summary(samples: list[float]) -> str:
    s = sorted(samples)
    return f"median {statistics.median(s) * 1e3:7.3f} ms   p90 {s[int(0.9 * (len(s) - 1))] * 1e3:7.3f} ms"


def runs_for(size: int, runs: int) -> int:
    return max(20, runs // 8) if size >= MiB else runs


async def timed_rounds(roundtrip: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(5):  # warm up
        await roundtrip()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await roundtrip()
        out.append(time.perf_counter() - t)
    return out


# -- bridge ----------------------------------------------------------------------------------------------------------


async def bench_bridge(runs: int, mb: int) -> dict[str, str]:
    async def echo(stream) -> None:
        while True:
            try:
                m = await stream.recv()
            except StreamClosed:
                return
            await stream.send(m)

    async def sink(stream) -> None:
        n = 0
        while True:
            try:
                m = await stream.recv()
            except StreamClosed:
                break
            if m == "done":
                await stream.send(n)
                return
            n += len(m)

    a, b = Libp2pTransport(Identity.generate()), Libp2pTransport(Identity.generate())
    b.set_handler(ECHO, echo)
    b.set_handler(SINK, sink)
    await a.start()
    await b.start()
    out = {}
    try:
        peer = PeerAddr(b.peer_id, tuple(b.listen_addrs))
        async with await a.open_stream(peer, ECHO) as stream:
            for name, size in SIZES.items():
                payload = b"x" * size

                async def rt(payload: bytes = payload) -> None:
                    await stream.send(payload)
                    await stream.recv()

                out[name] = summary(await timed_rounds(rt, runs_for(size, runs)))
        out["call() 64 B"] = summary(await timed_rounds(lambda: a.call(peer, ECHO, b"x" * 64), runs))
        async with await a.open_stream(peer, SINK) as stream:
            chunk = b"x" * MiB
            t = time.perf_counter()
            for _ in range(mb):
                await stream.send(chunk)
            await stream.send("done")
            assert await stream.recv() == mb * MiB
            out["throughput"] = f"{mb / (time.perf_counter() - t):7.1f} MB/s"
    finally:
        await a.stop()
        await b.stop()
    return out


# -- raw libp2p in trio ----------------------------------------------------------------------------------------------


async def _read_frame(stream, decoder: FrameDecoder, queue: list[object]) -> object:
    while not queue:
        queue.extend(decoder.feed(await stream.read(256 * 1024)))
    return queue.pop(0)


async def _raw_libp2p(runs: int, mb: int) -> dict[str, str]:
    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr

    async def echo(stream) -> None:
        decoder, queue = FrameDecoder(), []
        try:
            while True:
                m = await _read_frame(stream, decoder, queue)
                await stream.write(encode_frame(m))
        except Exception:  # noqa: BLE001 - whatever ends the stream (EOF, reset) ends the echo
            await stream.reset()

    async def sink(stream) -> None:
        decoder, queue, n = FrameDecoder(), [], 0
        while True:
            m = await _read_frame(stream, decoder, queue)
            if m == "done":
                await stream.write(encode_frame(n))
                await stream.close()
                return
            n += len(m)

    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    ha, hb = (
        build_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]),
        build_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]),
    )
    hb.set_stream_handler(TProtocol(ECHO), echo)
    hb.set_stream_handler(TProtocol(SINK), sink)
    out = {}
    async with ha.run(listen), hb.run(listen):
        info = info_from_p2p_addr(hb.get_addrs()[0])
        await ha.connect(info)
        stream = await ha.new_stream(info.peer_id, [TProtocol(ECHO)])
        decoder, queue = FrameDecoder(), []
        for name, size in SIZES.items():
            payload = b"x" * size

            async def rt(payload: bytes = payload) -> None:
                await stream.write(encode_frame(payload))
                await _read_frame(stream, decoder, queue)

            samples = []
            for i in range(5 + runs_for(size, runs)):
                t = time.perf_counter()
                await rt()
                if i >= 5:
                    samples.append(time.perf_counter() - t)
            out[name] = summary(samples)
        await stream.reset()
        stream = await ha.new_stream(info.peer_id, [TProtocol(SINK)])
        chunk = encode_frame(b"x" * MiB)
        t = time.perf_counter()
        for _ in range(mb):
            await stream.write(chunk)
        await stream.write(encode_frame("done"))
        assert await _read_frame(stream, FrameDecoder(), []) == mb * MiB
        out["throughput"] = f"{mb / (time.perf_counter() - t):7.1f} MB/s"
        await ha.close()
        await hb.close()
    return out


def bench_raw_libp2p(runs: int, mb: int) -> dict[str, str]:
    return trio.run(_raw_libp2p, runs, mb)


# -- raw TCP ---------------------------------------------------------------------------------------------------------


async def _read_tcp_frame(reader: asyncio.StreamReader) -> object:
    header = await reader.readexactly(4)
    payload = await reader.readexactly(int.from_bytes(header, "big"))
    return FrameDecoder().feed(header + payload)[0]


async def bench_tcp(runs: int, mb: int) -> dict[str, str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                m = await _read_tcp_frame(reader)
                if m == "done":
                    writer.write(encode_frame(n))
                    n = 0
                elif m == "sink":
                    n = 0
                elif isinstance(m, list):  # sink payload
                    n += len(m[0])
                    continue
                else:
                    writer.write(encode_frame(m))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = {}
    for name, size in SIZES.items():
        payload = b"x" * size

        async def rt(payload: bytes = payload) -> None:
            writer.write(encode_frame(payload))
            await writer.drain()
            await _read_tcp_frame(reader)

        out[name] = summary(await timed_rounds(rt, runs_for(size, runs)))
    chunk = encode_frame([b"x" * MiB])
    t = time.perf_counter()
    for _ in range(mb):
        writer.write(chunk)
        await writer.drain()
    writer.write(encode_frame("done"))
    await writer.drain()
    assert await _read_tcp_frame(reader) == mb * MiB
    out["throughput"] = f"{mb / (time.perf_counter() - t):7.1f} MB/s"
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.1)  # let the server side see EOF and finish before closing the listener
    server.close()
    await server.wait_closed()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="round trips per size (1 MiB: runs/8, at least 20)")
    parser.add_argument("--mb", type=int, default=64, help="MiB streamed one way for the throughput figure")
    args = parser.parse_args()
    results = {
        "bridge (asyncio<->trio, libp2p)": asyncio.run(bench_bridge(args.runs, args.mb)),
        "raw libp2p (trio, no bridge)": bench_raw_libp2p(args.runs, args.mb),
        "raw asyncio TCP": asyncio.run(bench_tcp(args.runs, args.mb)),
    }
    for path, figures in results.items():
        print(f"\n{path}")
        for name, value in figures.items():
            print(f"  {name:<12} {value}")


if __name__ == "__main__":
    main()
