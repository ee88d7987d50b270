"""The direct data plane's own checks (the shared transport contract runs in test_transport.py): identity binding
of the TLS certificate, refusal of a wrong peer id or a forged dialer proof, the composite transport's choice of
plane and its libp2p fallback for a peer reachable only through a relay, and the direct address in server records.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import AsyncIterator

import pytest

from petal.daemon.identity import Identity
from petal.daemon.net import tls
from petal.daemon.net.addrs import is_circuit
from petal.daemon.net.composite import CompositeTransport
from petal.daemon.net.direct import HELLO, MUX, DirectTransport, direct_addr, parse_direct_addr
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import DialError, PeerAddr, StreamClosed
from petal.protocol.records import RecordError, ServerRecord

BLOCK = "/petal/block/test-echo/1"  # a block protocol: the composite sends it over the direct plane
OTHER = "/test/other/1"

pytestmark = pytest.mark.timeout(60)


async def echo(stream) -> None:
    while True:
        try:
            message = await stream.recv()
        except StreamClosed:
            return
        await stream.send(message)


def addr(t: DirectTransport) -> PeerAddr:
    return PeerAddr(t.peer_id, tuple(t.listen_addrs))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[DirectTransport, DirectTransport, DirectTransport]]:
    ts = tuple(DirectTransport(Identity.generate()) for _ in range(3))
    for t in ts:
        t.set_handler(BLOCK, echo)
    await asyncio.gather(*(t.start() for t in ts))
    try:
        yield ts
    finally:
        await asyncio.gather(*(t.stop() for t in ts))


def test_certificate_key_is_the_identity_key():
    ident = Identity.generate()
    _, der = tls.server_context(ident)
    assert tls.peer_id_of_certificate(der) == ident.peer_id
    proof = tls.client_proof(ident, der)
    assert tls.check_client_proof(proof, der) == ident.peer_id
    _, other_der = tls.server_context(Identity.generate())
    with pytest.raises(tls.PeerAuthError):  # a proof made for one server is worthless at another
        tls.check_client_proof(proof, other_der)
    with pytest.raises(tls.PeerAuthError):
        tls.check_client_proof(proof[:-1] + bytes([proof[-1] ^ 1]), der)


def test_direct_addresses_parse():
    a = direct_addr("127.0.0.1", 4001, "12D3KooWX")
    assert a == "/ip4/127.0.0.1/tcp/4001/tls/p2p/12D3KooWX" and parse_direct_addr(a) == ("127.0.0.1", 4001)
    for bad in ("/ip4/127.0.0.1/tcp/4001/p2p/X", "/ip4/h/udp/1/tls", "ip4/h/tcp/1/tls", "/ip4/h/tcp/0/tls"):
        with pytest.raises(DialError, match="bad direct address"):
            parse_direct_addr(bad)


async def test_wrong_peer_id_is_refused(pair):
    a, b, c = pair
    impostor = PeerAddr(c.peer_id, tuple(b.listen_addrs))  # b's endpoint, but we expect c there
    with pytest.raises(DialError, match=f"is peer {b.peer_id}, not {c.peer_id}"):
        await a.call(impostor, BLOCK, 1, timeout=10)
    assert a.connection_count(c.peer_id) == 0 and a.connection_count(b.peer_id) == 0
    assert await a.call(addr(b), BLOCK, "real") == "real"


@pytest.mark.parametrize("proof", ["forged", "none", "garbage"])
async def test_dialer_without_a_valid_proof_is_refused(pair, caplog, proof):
    _, b, _ = pair
    caplog.set_level(logging.INFO)
    host, port = parse_direct_addr(b.listen_addrs[0])
    ctx = tls.client_context()
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    if proof == "forged":  # claims another node's key with a signature of ours
        victim, me = Identity.generate(), Identity.generate()
        body = victim.public_key + tls.client_proof(me, der)[32:]
        writer.write(MUX.pack(0, HELLO, len(body)) + body)
    elif proof == "garbage":
        writer.write(b"\x00" * 9 + b"hello")
    else:
        writer.write(MUX.pack(1, 0, 3) + b"/x/")  # opens a stream without proving anything first
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
        await asyncio.wait_for(reader.readexactly(1), 10)
    writer.close()
    assert any("refused a direct connection" in r.getMessage() for r in caplog.records)
    assert b.connection_count(victim.peer_id if proof == "forged" else "") == 0


async def test_one_connection_carries_both_directions(pair):
    a, b, _ = pair
    assert await a.call(addr(b), BLOCK, 1) == 1
    assert await b.call(addr(a), BLOCK, 2) == 2  # b reuses the connection a dialed
    assert a.connection_count(b.peer_id) == 1 and b.connection_count(a.peer_id) == 1


@pytest.fixture
async def composites() -> AsyncIterator[tuple[CompositeTransport, CompositeTransport, Libp2pTransport]]:
    before = set(threading.enumerate())
    ids = [Identity.generate() for _ in range(2)]
    ts = [CompositeTransport(Libp2pTransport(i), DirectTransport(i)) for i in ids]
    relay = Libp2pTransport(Identity.generate(), relay_service=True)
    for t in ts:
        t.set_handler(BLOCK, echo)
        t.set_handler(OTHER, echo)
    await asyncio.gather(relay.start(), *(t.start() for t in ts))
    try:
        yield ts[0], ts[1], relay
    finally:
        await asyncio.gather(relay.stop(), *(t.stop() for t in ts))
        stray = [t for t in threading.enumerate() if t not in before]
        assert not stray, f"threads left running after stop(): {stray}"


async def test_composite_sends_block_protocols_direct_and_others_over_libp2p(composites):
    a, b, _ = composites
    assert b.direct_addrs and all(x.endswith(f"/tls/p2p/{b.peer_id}") for x in b.direct_addrs)
    assert not any("/tls/" in x for x in b.listen_addrs)
    peer = PeerAddr(b.peer_id, (*b.direct_addrs, *b.listen_addrs))
    assert await a.call(peer, BLOCK, {"x": b"y" * 100_000}) == {"x": b"y" * 100_000}
    assert (a.direct_streams, a.fallback_streams) == (1, 0)
    assert a.direct.connection_count(b.peer_id) == 1
    assert await a.call(peer, OTHER, 3) == 3  # not a block protocol: libp2p
    assert a.direct_streams == 1 and a.libp2p.connection_count(b.peer_id) == 1
    # a peer that announced no direct address: libp2p, without trying
    assert await a.call(PeerAddr(b.peer_id, tuple(b.listen_addrs)), BLOCK, 4) == 4
    assert (a.direct_streams, a.fallback_streams) == (1, 0)


async def test_relay_only_peer_is_served_through_the_libp2p_fallback(composites):
    """The private peer announces a direct address nobody can reach (behind NAT) and a relay circuit: block
    traffic falls back to libp2p through the relay, and later streams skip the dead direct address."""
    a, private, relay = composites
    circuit = await private.use_relay(
        PeerAddr(relay.peer_id, tuple(x for x in relay.listen_addrs if not is_circuit(x)))
    )
    host, port = parse_direct_addr(private.direct_addrs[0])
    await private.direct.stop()  # its direct port is closed to the world
    peer = PeerAddr(private.peer_id, (direct_addr(host, port, private.peer_id), circuit))
    assert await a.call(peer, BLOCK, {"hello": b"\x00" * 5000}) == {"hello": b"\x00" * 5000}
    assert (a.direct_streams, a.fallback_streams) == (0, 1)
    async with await a.open_stream(peer, BLOCK) as stream:  # backed off: straight to the relayed connection
        for i in range(3):
            await stream.send(i)
            assert await stream.recv(timeout=10) == i
    assert (a.direct_streams, a.fallback_streams) == (0, 2)
    assert a.libp2p.connection_count(private.peer_id) == 1


def test_server_record_carries_the_direct_address_and_old_records_stay_valid():
    def record(direct: tuple[str, ...] = ()) -> ServerRecord:
        return ServerRecord(("/ip4/1.2.3.4/tcp/1/p2p/X",), 0, 2, "online", 1.0, 5, "float32", 1, direct=direct)

    old = record().to_value()
    assert "x" not in old and ServerRecord.from_value(old).direct == ()
    new = record(("/ip4/1.2.3.4/tcp/2/tls/p2p/X",)).to_value()
    assert ServerRecord.from_value(new).direct == ("/ip4/1.2.3.4/tcp/2/tls/p2p/X",)
    for bad in ("/ip4/x", [1], {"a": 1}):
        with pytest.raises(RecordError, match="direct addresses"):
            ServerRecord.from_value({**new, "x": bad})


async def test_a_stream_flooded_past_its_unread_limit_is_reset_and_others_go_on(pair, monkeypatch, caplog):
    """A peer that sends without waiting for answers costs bounded memory: its stream is reset (the connection and
    the peer's other streams stay up), and the connection closes once all its streams together hold too much."""
    import petal.daemon.net.direct as direct

    a, b, _ = pair
    held: list = []

    async def sink(stream) -> None:  # never reads: everything sent to it stays unread
        held.append(stream)
        await asyncio.sleep(30)

    b.set_handler("/petal/block/sink/1", sink)
    monkeypatch.setattr(direct, "MAX_UNREAD", 10_000)
    flood = await a.open_stream(addr(b), "/petal/block/sink/1")
    other = await a.open_stream(addr(b), BLOCK)
    with caplog.at_level(logging.WARNING, logger="petal.daemon.net.direct"):
        with pytest.raises(direct.StreamReset):
            for _ in range(100):
                await flood.send(b"x" * 1000)
                await asyncio.sleep(0.01)
        assert "unread bytes" in caplog.text
    await other.send({"still": "up"})
    assert await other.recv(timeout=5) == {"still": "up"}
    assert held and held[0]._conn.unread == 0  # a reset stream's bytes no longer count against the connection

    monkeypatch.setattr(direct, "MAX_UNREAD", 1 << 30)
    monkeypatch.setattr(direct, "MAX_CONN_UNREAD", 20_000)
    flood = await a.open_stream(addr(b), "/petal/block/sink/1")
    with pytest.raises(direct.StreamReset):
        for _ in range(100):
            await flood.send(b"x" * 1000)
            await asyncio.sleep(0.01)
    assert not a.connected(b.peer_id) or all(c.closed for c in a._conns.get(b.peer_id, []))


async def test_a_thread_sends_on_a_direct_stream_in_order_and_nothing_after_its_end(pair):
    """`thread_sender`: the compute thread encodes and the loop writes, in order; a send after the stream ended is
    dropped (the stream's task sees the end itself), and a stream kind without it (memory, libp2p) answers None."""
    from petal.daemon.net.transport import MemoryNetwork, MemoryTransport, thread_sender

    a, b, _ = pair
    stream = await a.open_stream(addr(b), BLOCK)  # b echoes
    send = thread_sender(stream)
    assert send is not None
    await asyncio.to_thread(lambda: [send({"n": i}) for i in range(50)])
    assert [await stream.recv(timeout=5) for _ in range(50)] == [{"n": i} for i in range(50)]
    await stream.reset()
    await asyncio.to_thread(send, {"n": "late"})  # dropped, no error
    await asyncio.sleep(0.05)

    net = MemoryNetwork()
    m1, m2 = MemoryTransport(net, "m1"), MemoryTransport(net, "m2")
    await m1.start()
    await m2.start()
    m2.set_handler(BLOCK, echo)
    try:
        assert thread_sender(await m1.open_stream(PeerAddr("m2"), BLOCK)) is None
    finally:
        await m1.stop()
        await m2.stop()
