"""RelayKeeper (daemon/net/relay.py): a relay that stops answering is replaced by the next candidate that accepts,
the dead circuit address leaves the announced addresses and the change is announced. Fakes only: the real thing runs
in tests/integration/test_nat_relay.py."""

from __future__ import annotations

import pytest

from petal.daemon.net.relay import RelayError, RelayKeeper
from petal.daemon.net.transport import PeerAddr

OWN = "/ip4/192.168.1.2/tcp/31330/p2p/US"


class FakeTransport:
    def __init__(self, refuse: set[str]) -> None:
        self.circuit_addrs: list[str] = []
        self.listen_addrs: list[str] = [OWN]
        self.refuse = refuse

    async def use_relay(self, relay: PeerAddr, timeout: float = 15.0) -> str:
        if relay.peer_id in self.refuse:
            raise RelayError(f"{relay.peer_id} offers no relay service")
        circuit = f"{relay.addrs[0]}/p2p/{relay.peer_id}/p2p-circuit/p2p/US"
        self.circuit_addrs.append(circuit)
        self.listen_addrs.append(circuit)
        return circuit


def peer(name: str) -> PeerAddr:
    return PeerAddr(name, (f"/ip4/10.0.0.{len(name)}/tcp/31330",))


async def test_dead_relay_is_replaced_by_the_next_candidate_that_accepts():
    transport = FakeTransport(refuse={"full"})
    alive = {"r1": True}
    changes = []

    async def probe(relay: PeerAddr) -> object:
        if not alive.get(relay.peer_id, True):
            raise TimeoutError("no answer")
        return {}

    async def candidates() -> list[PeerAddr]:
        return [peer("r1"), peer("full"), peer("r2")]

    async def on_change() -> None:
        changes.append(list(transport.listen_addrs))

    keeper = RelayKeeper(transport, probe, candidates, on_change, period=0.01)
    first = await keeper.use(peer("r1"))
    assert transport.listen_addrs == [OWN, first]
    alive["r1"] = False
    assert await keeper.replace() is True  # what run() does after two failed probes
    assert keeper.relay is not None and keeper.relay.peer_id == "r2" and keeper.replaced == 1
    assert transport.circuit_addrs == [keeper.circuit] and first not in transport.listen_addrs
    assert changes == [[OWN, keeper.circuit]]


async def test_no_candidate_left_leaves_no_dead_address_and_says_so(caplog: pytest.LogCaptureFixture):
    transport = FakeTransport(refuse={"full"})

    async def probe(relay: PeerAddr) -> object:
        raise TimeoutError("no answer")

    async def candidates() -> list[PeerAddr]:
        return [peer("r1"), peer("full")]

    async def on_change() -> None:
        raise AssertionError("nothing changed")

    keeper = RelayKeeper(transport, probe, candidates, on_change, period=0.01)
    await keeper.use(peer("r1"))
    assert await keeper.replace() is False
    assert transport.listen_addrs == [OWN] and transport.circuit_addrs == [] and keeper.relay is None
    assert "more --initial-peer" in caplog.text
