"""The transport contract, run against both implementations: real libp2p on 127.0.0.1 and the in-memory twin.

Run as a script (`python tests/test_transport.py serve`) it is the echo server of the two-process test.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from petal.daemon.identity import Identity
from petal.daemon.net.transport import (
    DialError,
    MemoryNetwork,
    MemoryTransport,
    PeerAddr,
    ProtocolNotSupported,
    StreamClosed,
    StreamReset,
    Transport,
    TransportError,
)
from petal.protocol.errors import WireError

ECHO = "/test/echo/1"
SILENT = "/test/silent/1"
BOOM = "/test/boom/1"
STREAM = "/test/stream/1"
FORWARD = "/test/forward/1"

pytestmark = pytest.mark.timeout(60)


async def echo(stream) -> None:
    """Answer every message with itself until the caller closes."""
    while True:
        try:
            message = await stream.recv()
        except StreamClosed:
            return
        await stream.send(message)


async def boom(stream) -> None:
    request = await stream.recv()
    if request == "boom":
        raise ValueError("handler failed on purpose")
    await stream.send({"ok": request})


class Node:
    """One transport with the test handlers installed, plus what tests need to reach it."""

    def __init__(self, transport: Transport) -> None:
        self.t = transport
        self.silent_started = asyncio.Event()
        self.stream_report: list[object] = []
        transport.set_handler(ECHO, echo)
        transport.set_handler(BOOM, boom)
        transport.set_handler(SILENT, self._silent)
        transport.set_handler(STREAM, self._stream)

    @property
    def addr(self) -> PeerAddr:
        return PeerAddr(self.t.peer_id, tuple(self.t.listen_addrs))

    async def _silent(self, stream) -> None:
        await stream.recv()
        self.silent_started.set()
        await asyncio.Event().wait()  # never answers

    async def _stream(self, stream) -> None:
        """Send `n` numbered messages while echoing every inbound one doubled; report what came in."""
        n = await stream.recv()

        async def produce() -> None:
            for i in range(n):
                await stream.send({"from_server": i})

        producer = asyncio.create_task(produce())
        got = 0
        while True:
            try:
                m = await stream.recv()
            except StreamClosed:
                break
            await stream.send({"double": m["i"] * 2})
            got += 1
        await producer
        await stream.send({"server_got": got})
        self.stream_report.append(got)


def make_libp2p() -> Transport:
    from petal.daemon.net.p2p import Libp2pTransport

    return Libp2pTransport(Identity.generate())


def make_direct() -> Transport:
    from petal.daemon.net.direct import DirectTransport

    return DirectTransport(Identity.generate())


@pytest.fixture(params=["memory", "libp2p", "direct"])
async def nodes(request) -> AsyncIterator[list[Node]]:
    """Three started nodes of one kind; stopped (and checked for stray threads) afterwards."""
    before = set(threading.enumerate())
    if request.param == "memory":
        net = MemoryNetwork()
        transports = [MemoryTransport(net, f"peer-{i}") for i in range(3)]
    elif request.param == "direct":
        transports = [make_direct() for _ in range(3)]
    else:
        transports = [make_libp2p() for _ in range(3)]
    result = [Node(t) for t in transports]
    await asyncio.gather(*(t.start() for t in transports))
    try:
        yield result
    finally:
        await asyncio.gather(*(t.stop() for t in transports))
        stray = [t for t in threading.enumerate() if t not in before]
        assert not stray, f"threads left running after stop(): {stray}"


def libp2p_only(node: Node) -> None:
    if isinstance(node.t, MemoryTransport):
        pytest.skip("libp2p-specific")


async def test_call_roundtrip(nodes):
    a, b, _ = nodes
    request = {"text": "héllo", "blob": b"\x00\x01" * 1000, "n": [1, 2.5, None, True]}
    assert await a.t.call(b.addr, ECHO, request) == request
    assert await b.t.call(a.addr, ECHO, 7) == 7  # and the other way, over the same connection for libp2p


async def test_listen_addrs_are_dialable_multiaddrs(nodes):
    a, _, _ = nodes
    assert a.t.listen_addrs and all(addr.endswith(f"/p2p/{a.t.peer_id}") for addr in a.t.listen_addrs)


async def test_bidirectional_stream_many_messages(nodes):
    a, b, _ = nodes
    n = 300
    async with await a.t.open_stream(b.addr, STREAM) as stream:
        await stream.send(n)

        async def send_all() -> None:
            for i in range(n):
                await stream.send({"i": i})
            await stream.close()

        sender = asyncio.create_task(send_all())
        from_server, doubles, final = [], [], None
        while True:
            try:
                m = await stream.recv(timeout=20)
            except StreamClosed:
                break
            if "from_server" in m:
                from_server.append(m["from_server"])
            elif "double" in m:
                doubles.append(m["double"])
            else:
                final = m
        await sender
    assert from_server == list(range(n))  # in order
    assert doubles == [2 * i for i in range(n)]
    assert final == {"server_got": n}
    assert b.stream_report == [n]


async def test_fifty_concurrent_calls_share_one_connection(nodes):
    a, b, _ = nodes
    results = await asyncio.gather(*(a.t.call(b.addr, ECHO, {"i": i, "pad": b"x" * i * 100}) for i in range(50)))
    assert [r["i"] for r in results] == list(range(50))
    assert all(r["pad"] == b"x" * r["i"] * 100 for r in results)
    if hasattr(a.t, "connection_count"):
        assert a.t.connection_count(b.t.peer_id) == 1


async def test_handler_that_raises_resets_stream_and_server_keeps_serving(nodes, caplog):
    a, b, _ = nodes
    with pytest.raises(StreamReset):
        await a.t.call(b.addr, BOOM, "boom", timeout=10)
    assert any("handler failed on purpose" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert await a.t.call(b.addr, BOOM, "fine") == {"ok": "fine"}


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x02\xc1\xc1", b"\xff\xff\xff\xff" + b"x" * 64],
    ids=["invalid-msgpack", "oversize-length"],
)
async def test_garbage_frame_resets_stream_and_server_keeps_serving(nodes, caplog, garbage):
    a, b, _ = nodes
    caplog.set_level(logging.WARNING)
    stream = await a.t.open_stream(b.addr, ECHO)
    await stream._send_raw(garbage)
    with pytest.raises(StreamReset):
        await stream.recv(timeout=10)
    await stream.close()
    assert any("malformed frame" in r.getMessage() for r in caplog.records)
    assert await a.t.call(b.addr, ECHO, "still here") == "still here"


async def test_unknown_protocol_is_a_clear_error(nodes):
    a, b, _ = nodes
    with pytest.raises(ProtocolNotSupported, match="/test/nope/1"):
        await a.t.call(b.addr, "/test/nope/1", 1, timeout=10)
    assert await a.t.call(b.addr, ECHO, 1) == 1


async def test_silent_handler_times_out_and_leaves_nothing(nodes):
    a, b, _ = nodes
    await a.t.call(b.addr, ECHO, "warm up")  # the connection exists
    await _eventually(lambda: _idle(a.t, b.t.peer_id))
    with pytest.raises(TimeoutError):
        await a.t.call(b.addr, SILENT, "anyone?", timeout=0.5)
    assert b.silent_started.is_set()
    await _eventually(lambda: _idle(a.t, b.t.peer_id))
    assert await a.t.call(b.addr, ECHO, "after") == "after"


async def test_recv_timeout_keeps_stream_usable(nodes):
    a, b, _ = nodes
    async with await a.t.open_stream(b.addr, ECHO) as stream:
        with pytest.raises(TimeoutError):
            await stream.recv(timeout=0.05)
        await stream.send("late")
        assert await stream.recv(timeout=10) == "late"


async def test_cancelled_open_stream_leaves_nothing_running(nodes):
    a, b, _ = nodes
    await a.t.call(b.addr, ECHO, "warm up")
    await _eventually(lambda: _idle(a.t, b.t.peer_id))
    task = asyncio.create_task(a.t.open_stream(b.addr, ECHO))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _eventually(lambda: _idle(a.t, b.t.peer_id))


async def test_peer_that_goes_away_mid_call_is_a_clear_error(nodes):
    a, b, _ = nodes
    call = asyncio.create_task(a.t.call(b.addr, SILENT, "hello", timeout=30))
    await asyncio.wait_for(b.silent_started.wait(), 10)
    await b.t.stop()
    with pytest.raises(TransportError):
        await asyncio.wait_for(call, 10)  # a hang would fail here, long before the call's own timeout


async def test_stopped_peer_cannot_be_dialed(nodes):
    a, b, _ = nodes
    await b.t.stop()
    with pytest.raises((DialError, TimeoutError)):
        await a.t.call(b.addr, ECHO, 1, timeout=10)


async def test_handler_can_call_a_third_node(nodes):
    a, b, c = nodes

    async def forward(stream) -> None:
        request = await stream.recv()
        answer = await b.t.call(c.addr, ECHO, request)
        await stream.send({"via": b.t.peer_id, "answer": answer})

    b.t.set_handler(FORWARD, forward)  # set while running
    assert await a.t.call(b.addr, FORWARD, "hop") == {"via": b.t.peer_id, "answer": "hop"}


async def test_unserializable_message_fails_at_send(nodes):
    a, b, _ = nodes
    async with await a.t.open_stream(b.addr, ECHO) as stream:
        with pytest.raises(WireError):
            await stream.send(object())
        await stream.send("fine")
        assert await stream.recv(timeout=10) == "fine"


async def test_open_stream_timeout_against_a_port_that_never_answers():
    """A TCP listener that accepts and stays mute: the Noise handshake stalls, open_stream times out cleanly."""
    from petal.daemon.net.p2p import Libp2pTransport

    mute_conns = []

    async def mute(reader, writer) -> None:
        mute_conns.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    before = set(threading.enumerate())
    a = Libp2pTransport(Identity.generate())
    await a.start()
    try:
        ghost = PeerAddr(Identity.generate().peer_id, (f"/ip4/127.0.0.1/tcp/{port}",))
        with pytest.raises(TimeoutError):
            await a.open_stream(ghost, ECHO, timeout=0.5)
        await _eventually(lambda: _trio_tasks(a) == 0)
    finally:
        await a.stop()
        for w in mute_conns:
            w.close()
        server.close()
        await server.wait_closed()
    assert set(threading.enumerate()) <= before


def _start_serve_process() -> subprocess.Popen[str]:
    """This file run as a script (`serve`, at the bottom): prints its peer id and address, echoes till stdin closes."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_two_processes(tmp_path):
    """A server in another OS process: call, stream, and a clean error once it exits."""
    from petal.daemon.net.p2p import Libp2pTransport

    proc = _start_serve_process()
    a = Libp2pTransport(Identity.generate())
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        peer_id, addr = line.split()
        server = PeerAddr(peer_id, (addr,))
        await a.start()
        assert await a.call(server, ECHO, {"x": b"y" * 100_000}) == {"x": b"y" * 100_000}
        async with await a.open_stream(server, ECHO) as stream:
            for i in range(100):
                await stream.send(i)
            assert [await stream.recv(timeout=10) for _ in range(100)] == list(range(100))
        proc.stdin.close()  # the server exits when its stdin closes
        await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        with pytest.raises((DialError, TimeoutError, StreamReset)):
            await a.call(server, ECHO, 1, timeout=10)
    finally:
        await a.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_dialback_tells_live_port_from_dead_one():
    import socket

    from petal.daemon.net.dialback import DIALBACK_PROTOCOL, check_reachability, serve_dialback
    from petal.daemon.net.p2p import Libp2pTransport

    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    a, b = Libp2pTransport(Identity.generate()), Libp2pTransport(Identity.generate())
    b.set_handler(DIALBACK_PROTOCOL, serve_dialback)
    await a.start()
    await b.start()
    try:
        helper = PeerAddr(b.peer_id, tuple(b.listen_addrs))
        answer = await check_reachability(a, helper)
        assert answer["observed_ip"] == "127.0.0.1"
        assert [r["reachable"] for r in answer["results"]] == [True] * len(a.listen_addrs)
        dead = f"/ip4/127.0.0.1/tcp/{dead_port}/p2p/{a.peer_id}"
        answer = await a.call(helper, DIALBACK_PROTOCOL, {"addrs": [dead, "/ip4/127.0.0.1/udp/9"]})
        assert [(r["dialed"], r["reachable"]) for r in answer["results"]] == [
            (f"127.0.0.1:{dead_port}", False),
            (None, False),
        ]
        with pytest.raises(StreamReset):  # a malformed request resets the stream, the helper keeps serving
            await a.call(helper, DIALBACK_PROTOCOL, {"addrs": "nope"})
        assert (await check_reachability(a, helper))["results"][0]["reachable"]
    finally:
        await a.stop()
        await b.stop()


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _trio_tasks(t: Transport) -> int:
    """Tasks in the libp2p transport's nursery (memory transports have none)."""
    bridge = getattr(t, "_bridge", None)
    if bridge is None or bridge.nursery is None:
        return 0
    return len(bridge.nursery.child_tasks)


def _idle(t: Transport, peer_id: str) -> bool:
    """No stream pump or pending operation in the transport's trio nursery, no open stream to the peer."""
    return _trio_tasks(t) == 0 and _open_streams(t, peer_id) == 0


def _open_streams(t: Transport, peer_id: str) -> int:
    if hasattr(t, "open_stream_count"):  # the direct transport counts its own
        return int(t.open_stream_count(peer_id))
    host = getattr(t, "_host", None)
    if host is None:
        return 0
    from libp2p.peer.id import ID

    return sum(len(c.get_streams()) for c in host.get_network().connections.get(ID.from_base58(peer_id), []))


async def _eventually(condition, attempts: int = 200) -> None:
    """Wait until `condition()` holds (cleanup crosses a thread); fails if it never does."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.02)
    assert condition()


async def _serve_until_stdin_closes() -> None:
    from petal.daemon.net.p2p import Libp2pTransport

    t = Libp2pTransport(Identity.generate())
    t.set_handler(ECHO, echo)
    await t.start()
    print(t.peer_id, t.listen_addrs[0], flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await t.stop()


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    asyncio.run(_serve_until_stdin_closes())
