"""`DirectUpgrade._check` on a fake host: a relayed-only peer gets one upgrade started, a peer with a direct
connection loses its relayed one after the grace, and a peer that falls back to relay-only after its direct
connection dropped is upgraded again (a CI run once kept such a peer relayed for good)."""

from __future__ import annotations

import trio
import trio.testing
from libp2p.connection_types import ConnectionType

from petal.daemon.net import dcutr


class _Conn:
    def __init__(self, relayed: bool) -> None:
        self.relayed, self.closed = relayed, False
        self._actual_transport_addresses = ["/ip4/10.0.0.1/tcp/1" + ("/p2p/R/p2p-circuit" if relayed else "")]

    def get_connection_type(self) -> ConnectionType:
        return ConnectionType.RELAYED if self.relayed else ConnectionType.DIRECT

    def get_streams(self) -> list:
        return []

    async def close(self) -> None:
        self.closed = True


class _Host:
    def __init__(self) -> None:
        self.connections: dict[str, list[_Conn]] = {}

    def get_network(self) -> _Host:
        return self

    def get_id(self) -> str:
        return "A"


def _upgrade_starts() -> tuple[dcutr.DirectUpgrade, _Host, list[str]]:
    host = _Host()
    up = dcutr.DirectUpgrade.__new__(dcutr.DirectUpgrade)
    up._host, up._own_id, up.relayed_seen, up.upgraded, up._started = host, "A", set(), set(), set()
    started: list[str] = []

    class _Nursery:
        def start_soon(self, fn, pid) -> None:
            started.append(str(pid))

    up._nursery = _Nursery()  # type: ignore[assignment]
    return up, host, started


def test_a_peer_back_on_a_relay_after_its_direct_connection_dropped_is_upgraded_again() -> None:
    async def main() -> None:
        up, host, started = _upgrade_starts()
        closing: dict[str, float] = {}
        host.connections["B"] = [_Conn(relayed=True)]
        await up._check(closing)
        await up._check(closing)
        assert started == ["B"]  # once, not every look
        relay, direct = host.connections["B"][0], _Conn(relayed=False)
        host.connections["B"] = [relay, direct]
        await up._check(closing)
        assert up.upgraded == {"B"} and not relay.closed
        await trio.sleep(dcutr.RELAY_GRACE + 0.1)
        await up._check(closing)
        assert relay.closed  # replaced: closed after the grace
        host.connections["B"] = [_Conn(relayed=True)]  # the direct connection dropped; the peer came back relayed
        await up._check(closing)
        assert started == ["B", "B"]
        assert dcutr.peer_links(host, up.upgraded)["B"]["reach"] == "relayed"  # type: ignore[arg-type]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # the grace passes at once
