"""Circuit relay v2 for the libp2p transport: ``Relay`` (trio side), ``RelayError`` and the relay limits.

libp2p 0.8.1 implements circuit relay v2 but does not plug it into the swarm, so we wire it by hand: every
transport accepts relayed connections (STOP); one started with ``relay_service=True`` also relays for others
(HOP, within ``RELAY_LIMITS``); ``reserve`` takes a slot on a relay and returns the circuit address to announce;
``dial`` connects through a ``/.../p2p/RELAY/p2p-circuit/p2p/PEER`` address. ``Relay`` runs in the transport's
trio thread; ``Libp2pTransport`` calls it through its bridge.

``RelayKeeper`` (asyncio side) keeps an unreachable daemon reachable: it watches the relay it reserved on and, when
that relay stops answering, drops the dead circuit address and reserves on another reachable peer.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import trio

from petal.daemon.net.addrs import parse_peer_id, strip_p2p
from petal.daemon.net.transport import DialError, PeerAddr

if TYPE_CHECKING:
    import multiaddr
    from libp2p.abc import IHost
    from libp2p.tools.anyio_service.api import ManagerAPI

__all__ = ["DIRECT_FIRST_TIMEOUT", "RELAY_CHECK_PERIOD", "RELAY_LIMITS", "Relay", "RelayError", "RelayKeeper"]

log = logging.getLogger(__name__)

RELAY_LIMITS = dict(duration=3600, data=1 << 30, max_circuit_conns=8, max_reservations=16)
"""What a relaying daemon grants: per circuit at most an hour and 1 GiB, 8 circuits per reserved peer, 16 peers.
A circuit that hits a limit is reset; the next `open_stream` dials a fresh one."""
RELAY_CHECK_PERIOD = 10.0
"""Seconds between checks that our relay still answers; two failed checks in a row replace it."""
DIRECT_FIRST_TIMEOUT = 3.0
"""When a peer has both direct and circuit addresses, how long the direct dial may take before we use the relay."""


class RelayError(DialError):
    """A relay refused us: it offers no relay service, has no room, or the target holds no reservation on it."""


class _RelayStreamEndFilter(logging.Filter):
    """libp2p 0.8.1's relay logs each ordinary end of a hop or circuit stream (EOF, reset) at ERROR, and a
    first dial to a peer it has no addresses for at WARNING; drop those so that real relay failures stand out."""

    BENIGN = ("stream is reset", "peer ID not found", "stream is closed")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().rstrip()
        return not (message.endswith(":") or any(b in message for b in self.BENIGN))


_RELAY_FILTER = _RelayStreamEndFilter()
for _name in ("libp2p.relay.circuit_v2.protocol", "libp2p.relay.circuit_v2.transport"):
    logging.getLogger(_name).addFilter(_RELAY_FILTER)


_OWN_CIRCUIT: contextvars.ContextVar[tuple[Any, ...] | None] = contextvars.ContextVar("petal_circuit", default=None)
"""The two streams of the circuit whose relaying task this is (set per trio task by ``_fix_circuit_cleanup``)."""


class _CircuitTable(dict[Any, Any]):
    """libp2p 0.8.1's relay keeps its circuits in ``_active_relays`` keyed by peer, and a circuit that ends closes the
    streams registered under its target's key: with two circuits to the same peer (two clients of one natted server),
    the first to end closes the other's, which happens each time DCUtR retires a relayed connection. Inside a
    relaying task this table answers with that task's own circuit, and forgets an entry only if it is that circuit."""

    def __contains__(self, key: object) -> bool:
        return _OWN_CIRCUIT.get() is not None or super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        own = _OWN_CIRCUIT.get()
        return own if own is not None else super().__getitem__(key)

    def __delitem__(self, key: Any) -> None:
        own = _OWN_CIRCUIT.get()
        if own is None:
            super().__delitem__(key)
            return
        entry = super().get(key)
        if entry is not None and {id(s) for s in entry if s is not None} <= {id(s) for s in own}:
            super().__delitem__(key)


def _fix_circuit_cleanup(proto: Any) -> None:
    """Make each circuit's end close its own streams only (see ``_CircuitTable``)."""
    proto._active_relays = _CircuitTable(proto._active_relays)
    relay_data = proto._relay_data

    async def own_relay_data(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        _OWN_CIRCUIT.set((src, dst))  # trio gives each task its own context: this task's circuit only
        await relay_data(src, dst, *args, **kwargs)

    proto._relay_data = own_relay_data


class Relay:
    """libp2p's circuit relay v2 on one host: STOP always (we accept relayed connections), HOP (relaying for
    others) when ``relay_service`` is set. Build and use it in the transport's trio thread."""

    def __init__(self, host: IHost, relay_service: bool) -> None:
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.relay.circuit_v2.resources import RelayLimits
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport

        self._host = host
        limits = RelayLimits(**RELAY_LIMITS)
        self._proto = CircuitV2Protocol(host, limits=limits, allow_hop=relay_service)
        _fix_circuit_cleanup(self._proto)
        # Role STOP only: with CLIENT, every dial through a relay would first reserve a slot there too.
        self._transport = CircuitV2Transport(host, self._proto, RelayConfig(roles=RelayRole.STOP, limits=limits))

    def running(self) -> AbstractAsyncContextManager[ManagerAPI]:
        """The relay protocol's service, running while the context is open."""
        from libp2p.tools.anyio_service import background_trio_service

        return background_trio_service(self._proto)

    def set_hop(self, enabled: bool) -> None:
        """Start or stop relaying for others."""
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID

        self._proto.allow_hop = enabled
        if enabled:
            self._host.set_stream_handler(HOP_ID, self._proto._handle_hop_stream)
        else:
            self._host.remove_stream_handler(HOP_ID)

    async def dial(self, circuit: multiaddr.Multiaddr) -> None:
        """Connect through the relay named in `circuit`; the relayed connection joins the swarm like any other."""
        try:
            await self._transport.dial(circuit)
        except Exception as e:  # noqa: BLE001 - libp2p raises ConnectionError/RelayConnectionError/SwarmException
            text = str(e)
            if "NO_RESERVATION" in text or "status 204" in text:
                hint = "the peer holds no reservation on that relay (it may have restarted or moved: look it up again)"
            elif "protocol" in text.lower() or "multiselect" in text.lower() or "negotiat" in text.lower():
                hint = "that peer offers no relay service (it runs with --no-relay or is not reachable itself)"
            else:
                hint = text
            raise RelayError(f"relaying through {circuit} failed: {hint}") from None

    async def reserve(
        self, relay: PeerAddr, direct: list[str], own_peer_id: str, nursery: trio.Nursery, timeout: float
    ) -> str:
        """Reserve a slot on `relay` at one of its `direct` addresses; returns our circuit address through it.

        libp2p refreshes the reservation (in `nursery`) before it expires for as long as the transport runs."""
        import multiaddr
        from libp2p.peer.peerinfo import PeerInfo
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID

        host = self._host
        pid = parse_peer_id(relay.peer_id)
        try:
            with trio.fail_after(timeout):
                try:
                    await host.connect(PeerInfo(pid, [multiaddr.Multiaddr(strip_p2p(a)) for a in direct]))
                except Exception as e:  # noqa: BLE001 - libp2p's dial errors have no common base
                    raise DialError(f"cannot reach relay {relay.peer_id} at {direct}: {e}") from None
                try:
                    hop = await host.new_stream(pid, [HOP_ID])
                except Exception:  # noqa: BLE001 - any failure to negotiate HOP means the same thing
                    raise RelayError(
                        f"peer {relay.peer_id} offers no relay service (it runs with --no-relay, or is not reachable "
                        "itself); reserve on another publicly reachable daemon"
                    ) from None
                try:
                    ok = await self._transport.reserve(hop, pid, nursery)
                finally:
                    with trio.CancelScope(shield=True):
                        try:
                            await hop.close()
                        except Exception as e:  # noqa: BLE001 - the reservation's outcome is what matters
                            log.debug("closing the hop stream to %s: %s", relay.peer_id, e)
        except trio.TooSlowError:
            raise TimeoutError(f"reserving a relay slot on {relay.peer_id} took longer than {timeout}s") from None
        if not ok:
            raise RelayError(
                f"relay {relay.peer_id} refused a reservation (it is full: at most {RELAY_LIMITS['max_reservations']} "
                "peers per relay); try another relay"
            )
        return f"{strip_p2p(direct[0])}/p2p/{relay.peer_id}/p2p-circuit/p2p/{own_peer_id}"


class RelayingTransport(Protocol):
    """What ``RelayKeeper`` needs of a transport (``Libp2pTransport``, or ``CompositeTransport`` delegating to it)."""

    circuit_addrs: list[str]
    listen_addrs: list[str]

    async def use_relay(self, relay: PeerAddr, timeout: float = 15.0) -> str: ...


class RelayKeeper:
    """Keeps a daemon that others cannot dial reachable through some relay.

    ``use`` reserves on a relay; ``run`` (a task) asks the relay every ``period`` seconds whether it is alive
    (``probe``, e.g. a node-info call) and after two failures in a row drops the circuit address through it and
    reserves on the first of ``candidates()`` (peers that may relay: initial peers, reachable servers) that accepts,
    then awaits ``on_change()`` so that the new address is announced.
    """

    def __init__(
        self,
        transport: RelayingTransport,
        probe: Callable[[PeerAddr], Awaitable[object]],
        candidates: Callable[[], Awaitable[list[PeerAddr]]],
        on_change: Callable[[], Awaitable[object]],
        period: float = RELAY_CHECK_PERIOD,
    ) -> None:
        self.transport = transport
        self.probe = probe
        self.candidates = candidates
        self.on_change = on_change
        self.period = period
        self.relay: PeerAddr | None = None
        self.circuit: str | None = None
        self.replaced = 0  # relays replaced so far (for status and tests)

    async def use(self, relay: PeerAddr) -> str:
        """Reserve on ``relay``; its circuit address replaces the one through our previous relay."""
        circuit = await self.transport.use_relay(relay)
        self._drop(keep=circuit)
        self.relay, self.circuit = relay, circuit
        return circuit

    def _drop(self, keep: str | None = None) -> None:
        old = self.circuit
        if old is not None and old != keep:
            for addrs in (self.transport.circuit_addrs, self.transport.listen_addrs):
                if old in addrs:
                    addrs.remove(old)

    async def run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.period)
            if self.relay is None:
                await self.replace()
                continue
            try:
                await self.probe(self.relay)
                failures = 0
                continue
            except Exception as e:  # noqa: BLE001 - any failure to answer counts
                failures += 1
                log.info("relay %s did not answer (%d): %s", self.relay.peer_id, failures, e)
            if failures >= 2:
                failures = 0
                await self.replace()

    async def replace(self) -> bool:
        """Drop the circuit through the current relay and reserve on another candidate; whether one accepted."""
        dead = self.relay.peer_id if self.relay is not None else None
        self._drop()
        self.relay = self.circuit = None
        try:
            candidates = await self.candidates()
        except Exception as e:  # noqa: BLE001 - retried at the next check
            log.warning("finding a new relay failed: %s", e)
            candidates = []
        for peer in candidates:
            if peer.peer_id == dead:
                continue
            try:
                circuit = await self.use(peer)
            except Exception as e:  # noqa: BLE001 - it cannot relay for us: try the next one
                log.info("peer %s cannot relay for us: %s", peer.peer_id, e)
                continue
            self.replaced += 1
            log.warning("relay %s is gone; others reach this daemon through %s at %s now", dead, peer.peer_id, circuit)
            await self.on_change()
            return True
        log.warning(
            "relay %s is gone and no other peer can relay for us yet: others cannot reach this daemon until one does "
            "(retrying every %.0f s); start petald with more --initial-peer addresses of reachable daemons",
            dead,
            self.period,
        )
        return False
