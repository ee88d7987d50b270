"""Direct connection upgrade through relay (DCUtR): ``DirectUpgrade`` and ``peer_links``.

A daemon behind a NAT is reached through a circuit relay (``relay.Relay``). Once a peer has connected to it that way,
py-libp2p's ``DCUtRProtocol`` (``/libp2p/dcutr``, run on every host) upgrades the connection: each side first dials
the other's own (non-circuit) addresses, then runs the DCUtR exchange over the relay (CONNECT with the addresses
others observe it at, SYNC, then both dial at once from their listen ports). libp2p's own loop looks for relayed
connections every 2 s and serves peers one after another; ``DirectUpgrade`` starts the upgrade of each new relayed
connection at once. When the peer that dialed through the relay is publicly reachable, the natted side's dial passes
its NAT (connection reversal). When both are behind NATs, the simultaneous dial is a TCP hole punch: it works
through NATs that keep the source port and drop unsolicited packets silently (tests/integration/test_nat_relay.py
runs one), not through symmetric NATs or NATs that answer a stray SYN with a RST (docs/operations.md).

Once a direct connection to a peer is up, ``DirectUpgrade`` closes the relayed one after ``RELAY_GRACE`` seconds (and,
when both ends dialed at once, the second direct one), so that every new stream (block traffic included) takes the
direct one: a host keeps one connection per peer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

import trio

if TYPE_CHECKING:
    from libp2p.abc import IHost, INetConn
    from libp2p.peer.id import ID

__all__ = ["CHECK_PERIOD", "DIAL_TIMEOUT", "RELAY_GRACE", "DirectUpgrade", "Reach", "conn_is_relayed", "peer_links"]

log = logging.getLogger(__name__)

CHECK_PERIOD = 1.0
"""Seconds between looks for peers that hold both a direct and a relayed connection."""
DIAL_TIMEOUT = 3
"""Seconds one upgrade dial may take (libp2p's default, 10, keeps a peer relayed that long per address a NAT drops)."""
RELAY_GRACE = 3.0
"""How long a relayed connection outlives the direct one that replaced it at least; it is closed once no stream is
open on it (an inference session that began on it keeps it until the session ends)."""

Reach = Literal["direct", "upgraded", "relayed"]


def _transport_addrs(conn: INetConn) -> list[str]:
    """The addresses `conn` really runs over (never the peerstore's, which `get_transport_addresses` falls back to)."""
    addrs = getattr(conn, "_actual_transport_addresses", None)
    if addrs is None:
        muxed = getattr(conn, "muxed_conn", None)
        addrs = muxed.get_transport_addresses() if muxed is not None else []
    return [str(a) for a in addrs]


def conn_is_relayed(conn: INetConn) -> bool:
    """Whether `conn` runs through a circuit relay (libp2p tags it RELAYED, or its address is a ``/p2p-circuit``)."""
    from libp2p.connection_types import ConnectionType

    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        addrs = _transport_addrs(conn)
    except Exception:  # noqa: BLE001 - a closing connection may not answer: call it relayed, never direct
        return True
    return not addrs or any("/p2p-circuit" in a for a in addrs)


def peer_links(host: IHost, upgraded: set[str]) -> dict[str, dict[str, str]]:
    """Each connected peer's best connection: ``{"reach": "direct" | "upgraded" | "relayed", "addr": remote address}``
    ("upgraded": direct, after the peer first came through a relay)."""
    out: dict[str, dict[str, str]] = {}
    for pid, conns in list(host.get_network().connections.items()):
        conns = list(conns) if isinstance(conns, list) else [conns]
        if not conns:
            continue
        peer = str(pid)
        direct = [c for c in conns if not conn_is_relayed(c)]
        best = (direct or conns)[0]
        reach: Reach = "relayed" if not direct else "upgraded" if peer in upgraded else "direct"
        addrs = _transport_addrs(best)
        out[peer] = {"reach": reach, "addr": addrs[0] if addrs else ""}
    return out


class DirectUpgrade:
    """py-libp2p's DCUtR on one host, plus the closing of relayed connections that a direct one replaced. Build and
    use it in the transport's trio thread."""

    def __init__(self, host: IHost) -> None:
        from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

        self._host = host
        self._own_id = str(host.get_id())
        self._proto = DCUtRProtocol(host, dial_timeout=DIAL_TIMEOUT)
        self.relayed_seen: set[str] = set()  # peers we ever held a relayed connection to
        self.upgraded: set[str] = set()  # of those, the ones we now (or last) held a direct connection to
        # relayed-only peers we started an upgrade for, while they stay connected and relayed-only
        self._started: set[str] = set()
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """DCUtR's service and our relay closer, running while the context is open."""
        from libp2p.tools.anyio_service import background_trio_service

        async with background_trio_service(self._proto), trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._close_replaced_relays)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    def links(self) -> dict[str, dict[str, str]]:
        return peer_links(self._host, self.upgraded)

    async def _upgrade(self, pid: ID) -> None:
        """Start DCUtR with a peer now: libp2p's own loop gets to it only after a sweep over every peer (seconds)."""
        try:
            await self._proto.initiate_hole_punch(pid)
        except Exception as e:  # noqa: BLE001 - libp2p's loop retries; this was only the head start
            log.debug("upgrading the relayed connection to %s: %s", pid, e)

    async def _close_replaced_relays(self) -> None:
        closing: dict[str, float] = {}  # peer -> when its relayed connections go
        while True:
            await trio.sleep(CHECK_PERIOD)
            try:
                await self._check(closing)
            except Exception as e:  # noqa: BLE001 - a connection closing under us: look again next time
                log.debug("checking for replaced relayed connections: %s", e)

    async def _check(self, closing: dict[str, float]) -> None:
        now = trio.current_time()
        table = list(self._host.get_network().connections.items())
        self._started &= {str(pid) for pid, conns in table if conns}
        for pid, conns in table:
            conns = list(conns) if isinstance(conns, list) else [conns]
            peer = str(pid)
            relayed = [c for c in conns if conn_is_relayed(c)]
            if relayed:
                self.relayed_seen.add(peer)
            if relayed and len(relayed) == len(conns) and peer not in self._started and self._nursery is not None:
                self._started.add(peer)
                self._nursery.start_soon(self._upgrade, pid)
            direct = [c for c in conns if c not in relayed]
            if direct:  # should the direct connection drop and the peer come back through a relay: upgrade again
                self._started.discard(peer)
            if direct and peer in self.relayed_seen and peer not in self.upgraded:
                self.upgraded.add(peer)
                log.info("the connection to %s is direct now (upgraded from a relayed one)", peer)
            extra = relayed if direct else []
            if len(direct) > 1 and self._own_id < peer:
                # both ends dialed at once: one end (the lower peer id, so that they never close different ones)
                # closes all but the first; a host keeps one connection per peer
                extra += direct[1:]
            if not extra:
                closing.pop(peer, None)
                continue
            due = closing.setdefault(peer, now + RELAY_GRACE)
            if now < due:
                continue
            for conn in extra:
                if conn.get_streams():  # a stream still open on it (a long inference session): wait until it ends
                    continue
                log.debug("closing a connection to %s that a direct one replaced", peer)
                await conn.close()
