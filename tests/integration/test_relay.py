"""Circuit relay v2 through Libp2pTransport: three real transports on 127.0.0.1 (relay, private, dialer).

"Behind NAT" is emulated by never telling the dialer the private node's direct address: the only way in is the
circuit address the private node got from `use_relay`. A bonus test puts the private node in its own network
namespace, where it truly cannot be dialed, when `ip netns` works here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from petal.daemon.identity import Identity
from petal.daemon.net.addrs import is_circuit
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.relay import RelayError
from petal.daemon.net.transport import DialError, PeerAddr, StreamClosed

ECHO = "/test/relay-echo/1"
CHAT = "/test/relay-chat/1"

pytestmark = pytest.mark.timeout(60)


async def echo(stream) -> None:
    while True:
        try:
            message = await stream.recv()
        except StreamClosed:
            return
        await stream.send({"echo": message, "to": "private"})


async def chat(stream) -> None:
    """Reply to each message with a running count, then say goodbye when the caller closes."""
    n = 0
    while True:
        try:
            message = await stream.recv()
        except StreamClosed:
            await stream.send({"bye": n})
            return
        n += 1
        await stream.send({"n": n, "got": message})


def direct(t: Libp2pTransport) -> PeerAddr:
    return PeerAddr(t.peer_id, tuple(a for a in t.listen_addrs if not is_circuit(a)))


@pytest.fixture
async def trio_nodes() -> AsyncIterator[tuple[Libp2pTransport, Libp2pTransport, Libp2pTransport]]:
    """relay (relay_service=True), private (serves ECHO and CHAT), dialer; all stopped afterwards, no stray threads."""
    before = set(threading.enumerate())
    relay = Libp2pTransport(Identity.generate(), relay_service=True)
    # DCUtR off: on loopback it would soon make the relayed connections these tests check direct
    private = Libp2pTransport(Identity.generate(), upgrade_relayed=False)
    dialer = Libp2pTransport(Identity.generate(), upgrade_relayed=False)
    private.set_handler(ECHO, echo)
    private.set_handler(CHAT, chat)
    nodes = (relay, private, dialer)
    await asyncio.gather(*(t.start() for t in nodes))
    try:
        yield nodes
    finally:
        await asyncio.gather(*(t.stop() for t in nodes))
        stray = [t for t in threading.enumerate() if t not in before]
        assert not stray, f"threads left running after stop(): {stray}"


async def test_call_through_relay(trio_nodes):
    relay, private, dialer = trio_nodes
    circuit = await private.use_relay(direct(relay))
    assert circuit == f"{direct(relay).addrs[0]}/p2p-circuit/p2p/{private.peer_id}"
    assert direct(relay).addrs[0].endswith(f"/p2p/{relay.peer_id}")
    assert circuit in private.listen_addrs and private.circuit_addrs == [circuit]

    only_circuit = PeerAddr(private.peer_id, (circuit,))  # the dialer never learns the direct address
    answer = await dialer.call(only_circuit, ECHO, {"hello": b"\x00" * 5000})
    assert answer == {"echo": {"hello": b"\x00" * 5000}, "to": "private"}
    # The connection is relayed: one connection to the private peer, and the dialer also holds one to the relay.
    assert dialer.connection_count(private.peer_id) == 1
    assert dialer.connection_count(relay.peer_id) == 1
    # A second call reuses the relayed connection.
    assert await dialer.call(only_circuit, ECHO, 2) == {"echo": 2, "to": "private"}
    assert dialer.connection_count(private.peer_id) == 1


async def test_bidirectional_stream_through_relay(trio_nodes):
    relay, private, dialer = trio_nodes
    circuit = await private.use_relay(direct(relay))
    stream = await dialer.open_stream(PeerAddr(private.peer_id, (circuit,)), CHAT)
    big = bytes(range(256)) * 1024  # 256 KiB: several relay read chunks per message
    for i in range(5):
        await stream.send({"i": i, "blob": big if i == 2 else b""})
        reply = await stream.recv(timeout=10)
        assert reply["n"] == i + 1 and reply["got"]["i"] == i
    assert reply is not None
    await stream.close()
    assert await stream.recv(timeout=10) == {"bye": 5}
    with pytest.raises(StreamClosed):
        await stream.recv(timeout=10)


async def test_use_relay_on_peer_without_relay_service(trio_nodes):
    _relay, private, dialer = trio_nodes
    with pytest.raises(RelayError, match="offers no relay service"):
        await private.use_relay(direct(dialer))  # the dialer was started without relay_service
    assert private.circuit_addrs == [] and not any(is_circuit(a) for a in private.listen_addrs)


async def test_dial_through_relay_without_reservation(trio_nodes):
    relay, private, dialer = trio_nodes
    # The private node never reserved: the relay has nobody to forward to.
    circuit = f"{direct(relay).addrs[0]}/p2p-circuit/p2p/{private.peer_id}"
    with pytest.raises(RelayError, match="no reservation") as info:
        await dialer.call(PeerAddr(private.peer_id, (circuit,)), ECHO, 1, timeout=20)
    assert isinstance(info.value, DialError)  # callers that handle unreachable peers handle this too


async def test_relay_service_can_be_switched_on_after_start(trio_nodes):
    relay, private, dialer = trio_nodes
    with pytest.raises(RelayError, match="offers no relay service"):
        await private.use_relay(direct(dialer))
    dialer.set_relay_service(True)  # what a daemon does once it learns it is publicly reachable
    circuit = await private.use_relay(direct(dialer))
    # A third node (the former relay) now reaches the private one through the dialer acting as relay.
    assert await relay.call(PeerAddr(private.peer_id, (circuit,)), ECHO, "x") == {"echo": "x", "to": "private"}


async def test_unreachable_node_reserves_on_its_helper_and_announces_the_circuit(trio_nodes, tmp_path):
    """daemon/node.py's fallback, on a Node whose reachability check failed (the check itself is tested elsewhere)."""
    from petal.daemon.config import Config
    from petal.daemon.node import Node

    relay, private, dialer = trio_nodes
    node = Node(Config(state_dir=tmp_path, socket=tmp_path / "s.sock"), identity=private.identity)
    node.transport = private
    private.set_relay_service(True)  # as a daemon starts, before it knows
    await node._reach_through_relay(direct(relay))
    assert private.relay_service is False
    circuits = [a for a in node.node_info()["addrs"] if is_circuit(a)]
    assert circuits == [f"{direct(relay).addrs[0]}/p2p-circuit/p2p/{private.peer_id}"]
    assert await dialer.call(PeerAddr(private.peer_id, tuple(circuits)), ECHO, 1) == {"echo": 1, "to": "private"}

    # A helper that offers no relay leaves the node as it was, with a warning rather than a crash.
    before = list(private.listen_addrs)
    await node._reach_through_relay(direct(dialer))
    assert private.listen_addrs == before
