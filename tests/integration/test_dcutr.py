"""DCUtR on loopback (runs anywhere, no namespaces): a connection that came through a circuit relay becomes direct,
the relayed one is closed, calls go on over the direct one, and ``peer_links`` says so on both ends. The real NAT
cases (connection reversal, a hole punch through two NATs) are in test_nat_relay.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from petal.daemon.identity import Identity
from petal.daemon.net.addrs import is_circuit
from petal.daemon.net.dcutr import RELAY_GRACE
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import PeerAddr
from tests.integration.test_relay import ECHO, echo

pytestmark = pytest.mark.timeout(60)


async def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def test_a_relayed_connection_is_upgraded_to_a_direct_one():
    relay = Libp2pTransport(Identity.generate(), relay_service=True)
    private, dialer = Libp2pTransport(Identity.generate()), Libp2pTransport(Identity.generate())
    private.set_handler(ECHO, echo)
    nodes = (relay, private, dialer)
    await asyncio.gather(*(t.start() for t in nodes))
    try:
        relay_addr = PeerAddr(relay.peer_id, tuple(a for a in relay.listen_addrs if not is_circuit(a)))
        circuit = await private.use_relay(relay_addr)
        only_circuit = PeerAddr(private.peer_id, (circuit,))  # the dialer never learns the direct address itself
        assert await dialer.call(only_circuit, ECHO, 1) == {"echo": 1, "to": "private"}

        def upgraded() -> bool:
            links = dialer.peer_links().get(private.peer_id, {}), private.peer_links().get(dialer.peer_id, {})
            return all(link.get("reach") == "upgraded" for link in links)

        assert await wait_for(upgraded, 20), (dialer.peer_links(), private.peer_links())
        link = dialer.peer_links()[private.peer_id]
        assert not is_circuit(link["addr"]) and link["addr"].startswith("/ip4/127.0.0.1/tcp/"), link
        # the relayed connection is closed after its grace period: one (direct) connection is left
        assert await wait_for(lambda: dialer.connection_count(private.peer_id) == 1, RELAY_GRACE + 10)
        assert await dialer.call(only_circuit, ECHO, 2) == {"echo": 2, "to": "private"}
        assert dialer.peer_links()[private.peer_id]["reach"] == "upgraded"
        assert dialer.peer_links()[relay.peer_id]["reach"] == "direct"
    finally:
        await asyncio.gather(*(t.stop() for t in nodes))


async def test_a_circuit_that_ends_leaves_other_circuits_to_the_same_peer_alone():
    """Two dialers reach one private node through the same relay; the first one's circuit ends (as when DCUtR
    retires it): the second one's keeps working (libp2p 0.8.1 closed it too; relay.py's _CircuitTable fixes it)."""
    relay = Libp2pTransport(Identity.generate(), relay_service=True)
    private = Libp2pTransport(Identity.generate(), upgrade_relayed=False)
    first, second = (Libp2pTransport(Identity.generate(), upgrade_relayed=False) for _ in range(2))
    private.set_handler(ECHO, echo)
    nodes = (relay, private, first, second)
    await asyncio.gather(*(t.start() for t in nodes))
    try:
        relay_addr = PeerAddr(relay.peer_id, tuple(a for a in relay.listen_addrs if not is_circuit(a)))
        only_circuit = PeerAddr(private.peer_id, (await private.use_relay(relay_addr),))
        assert await first.call(only_circuit, ECHO, 1) == {"echo": 1, "to": "private"}
        assert await second.call(only_circuit, ECHO, 2) == {"echo": 2, "to": "private"}
        await first.stop()  # its circuit ends
        await asyncio.sleep(1.0)
        assert second.connection_count(private.peer_id) == 1
        assert await second.call(only_circuit, ECHO, 3, timeout=5) == {"echo": 3, "to": "private"}
        assert second.peer_links()[private.peer_id]["reach"] == "relayed"  # the same circuit, not a new dial
    finally:
        await asyncio.gather(*(t.stop() for t in nodes))
