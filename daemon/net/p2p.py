"""The libp2p transport: ``Libp2pTransport`` (the ``Transport`` of ``petal.daemon.net.transport`` over py-libp2p)
and ``build_host``.

py-libp2p is trio-native and runs in the transport's own thread; ``bridge.Bridge`` hands work across,
``libp2p_stream.Libp2pStream`` is one stream, ``relay.Relay`` the circuit relay v2 wiring, ``dcutr.DirectUpgrade``
the upgrade of relayed connections to direct ones (DCUtR). This module owns the
host's life (start, listen, stop), protocol handlers, and dialing: direct addresses first, then relay circuits.

Security is Noise only and muxing yamux only (never mplex); one connection per peer, reused by every stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from petal.daemon.identity import Identity
from petal.daemon.net.addrs import is_circuit, is_direct_addr, parse_peer_id, strip_p2p
from petal.daemon.net.bridge import Bridge
from petal.daemon.net.dcutr import DirectUpgrade, peer_links
from petal.daemon.net.libp2p_stream import Libp2pStream
from petal.daemon.net.relay import DIRECT_FIRST_TIMEOUT, Relay, RelayError
from petal.daemon.net.transport import (
    DialError,
    Handler,
    PeerAddr,
    ProtocolNotSupported,
    TransportError,
    call_over,
    serve_stream,
)

if TYPE_CHECKING:
    import multiaddr
    from libp2p.abc import IHost, INetStream
    from libp2p.peer.id import ID

__all__ = ["Libp2pTransport", "build_host"]

log = logging.getLogger(__name__)


def build_host(identity: Identity, listen: Sequence[str]) -> IHost:
    """A libp2p host with Noise + yamux only and at most one connection per peer.

    `max_connections_per_peer=1` matters beyond resource use: with the default (3) every dial to a connected
    peer waits ~250 ms for extra connections.
    """
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.network.swarm import Swarm
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    key_pair = identity.libp2p_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: noise},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen],
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    # libp2p's AutoConnector keeps dialing every peer in the peerstore until ~100 connections are open. Our
    # router decides whom to talk to, so it stays off (its start() is what arms it).
    network = host.get_network()
    if not isinstance(network, Swarm):
        raise TransportError(
            f"libp2p built a {type(network).__name__}, not the Swarm whose auto-connector we switch off"
        )
    connector = network.auto_connector

    async def _off() -> None:
        return None

    connector.start = _off  # type: ignore[method-assign]  # switching it off is the point
    connector.stop = _off  # type: ignore[method-assign]
    return host


class Libp2pTransport:
    """`Transport` over py-libp2p (TCP, Noise, yamux). Construct, `await start()`, use, `await stop()`."""

    def __init__(
        self,
        identity: Identity,
        listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        relay_service: bool = False,
        upgrade_relayed: bool = True,
    ) -> None:
        self.identity = identity
        self.relay_service = relay_service
        self.upgrade_relayed = upgrade_relayed  # DCUtR on (off only where relayed connections must stay relayed)
        self.circuit_addrs: list[str] = []  # also appended to listen_addrs: what others dial through relays
        self._relay: Relay | None = None  # trio side, built with the host
        self._upgrade: DirectUpgrade | None = None  # DCUtR: relayed connections become direct (trio side)
        self.peer_id = identity.peer_id
        self.listen_addrs: list[str] = []
        self._listen = tuple(listen)
        self._handlers: dict[str, Handler] = {}
        self._bridge: Bridge | None = None
        self._host: IHost | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: trio.Event | None = None
        self._finished: asyncio.Future[None] | None = None
        self._handler_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the trio thread and listen; returns once `listen_addrs` is known (raises if listening failed)."""
        if self._thread is not None:
            raise TransportError("this Libp2pTransport was already started; create a new one")
        loop = asyncio.get_running_loop()
        self._bridge = Bridge(loop)
        started: asyncio.Future[list[str]] = loop.create_future()
        self._finished = loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name=f"petal-libp2p-{self.peer_id[-6:]}", daemon=True
        )
        self._thread.start()
        try:
            self.listen_addrs = await started
        except BaseException:
            await self.stop()
            raise

    def _thread_main(self, started: asyncio.Future[list[str]]) -> None:
        bridge = self._bridge
        assert bridge is not None and self._finished is not None
        error: BaseException | None = None
        try:
            trio.run(self._trio_main, started)
        except BaseException as e:
            error = e
            log.exception("the libp2p thread failed")
        finally:
            bridge.token = None
            bridge.nursery = None

            def finish() -> None:
                if not started.done():
                    started.set_exception(
                        TransportError(f"libp2p failed to start listening on {list(self._listen)}: {error!r}")
                    )
                assert self._finished is not None
                if not self._finished.done():
                    self._finished.set_result(None)

            bridge.to_asyncio(finish)

    async def _trio_main(self, started: asyncio.Future[list[str]]) -> None:
        import multiaddr

        bridge = self._bridge
        assert bridge is not None
        self._stop_event = trio.Event()
        host = build_host(self.identity, self._listen)
        self._host = host
        for protocol_id in self._handlers:
            self._register(protocol_id)
        async with host.run([multiaddr.Multiaddr(a) for a in self._listen]), self._run_relay(host):
            async with trio.open_nursery() as nursery:
                bridge.nursery = nursery
                bridge.token = trio.lowlevel.current_trio_token()
                addrs = [str(a) for a in host.get_addrs()]

                def listening() -> None:
                    if not started.done():
                        started.set_result(addrs)

                bridge.to_asyncio(listening)
                await self._stop_event.wait()
                bridge.nursery = None
                nursery.cancel_scope.cancel()
            await host.close()

    @asynccontextmanager
    async def _run_relay(self, host: IHost) -> AsyncIterator[None]:
        """Circuit relay v2 and DCUtR on `host` (built once the host runs), running while the context is open."""
        self._relay = Relay(host, self.relay_service)
        if not self.upgrade_relayed:
            async with self._relay.running():
                yield
            return
        self._upgrade = DirectUpgrade(host)
        async with self._relay.running(), self._upgrade.running():
            yield

    async def stop(self) -> None:
        """Cancel handlers, close every stream and connection, and join the trio thread."""
        for task in list(self._handler_tasks):
            task.cancel()
        await asyncio.gather(*self._handler_tasks, return_exceptions=True)
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._bridge is not None and self._stop_event is not None:
            self._bridge.to_trio_quiet(self._stop_event.set)
        if self._finished is not None:
            await self._finished
        thread.join()
        self._thread = None

    # -- handlers ----------------------------------------------------------------------------------------------

    def set_handler(self, protocol_id: str, handler: Handler) -> None:
        """Serve `protocol_id`: each inbound stream runs `handler(stream)` as an asyncio task."""
        self._handlers[protocol_id] = handler
        if self._bridge is not None and self._bridge.token is not None:
            self._bridge.to_trio(self._register, protocol_id)

    def _register(self, protocol_id: str) -> None:
        from libp2p.custom_types import TProtocol

        assert self._host is not None
        bridge = self._bridge
        assert bridge is not None

        async def on_stream(net_stream: INetStream) -> None:
            # Runs in libp2p's connection nursery: it must never raise, or the whole connection goes down.
            try:
                peer_id = str(net_stream.muxed_conn.peer_id)
                stream = Libp2pStream(bridge, net_stream, peer_id, protocol_id)
                bridge.to_asyncio(self._start_handler, stream)
                await stream.pump()
            except Exception:
                log.exception("inbound %s stream failed", protocol_id)

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    def _start_handler(self, stream: Libp2pStream) -> None:
        handler = self._handlers.get(stream.protocol_id)
        if handler is None:
            if self._bridge is not None:
                self._bridge.to_trio_quiet(stream.abort)
            return
        task = asyncio.get_running_loop().create_task(serve_stream(stream, handler))
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    # -- outbound ----------------------------------------------------------------------------------------------

    async def open_stream(self, peer: PeerAddr, protocol_id: str, timeout: float = 10.0) -> Libp2pStream:
        """Open a stream, dialing the peer first if we hold no connection to it."""
        if self._bridge is None or self._bridge.token is None:
            raise DialError("the libp2p transport is not running: call start() first")

        return await self._bridge.run(self._open, peer, protocol_id, timeout, discard=Libp2pStream.abort)

    async def _open(self, peer: PeerAddr, protocol_id: str, timeout: float) -> Libp2pStream:
        import multiaddr
        from libp2p.custom_types import TProtocol

        host, bridge = self._host, self._bridge
        assert host is not None and bridge is not None and bridge.nursery is not None
        pid = parse_peer_id(peer.peer_id)
        try:
            addrs = [
                multiaddr.Multiaddr(strip_p2p(a)) for a in peer.addrs if not is_circuit(a) and not is_direct_addr(a)
            ]
            circuits = [multiaddr.Multiaddr(a) for a in peer.addrs if is_circuit(a)]
        except Exception as e:  # noqa: BLE001 - the multiaddr package raises several unrelated types
            raise DialError(f"bad multiaddr in {peer.addrs}: {e}") from None
        try:
            with trio.fail_after(timeout):
                await self._connect(pid, addrs, circuits, peer)
                try:
                    net_stream = await host.new_stream(pid, [TProtocol(protocol_id)])
                except Exception as e:  # noqa: BLE001 - sorted below into ProtocolNotSupported or DialError
                    cause = e.__cause__ or e
                    if "protocol" in str(cause).lower() or "multiselect" in type(cause).__name__.lower():
                        raise ProtocolNotSupported(
                            f"peer {peer.peer_id} does not serve protocol {protocol_id} ({cause})"
                        ) from None
                    raise DialError(f"cannot open a {protocol_id} stream to {peer.peer_id}: {e}") from None
        except trio.TooSlowError:
            raise TimeoutError(
                f"opening a {protocol_id} stream to {peer.peer_id} took longer than {timeout}s"
            ) from None
        stream = Libp2pStream(bridge, net_stream, peer.peer_id, protocol_id)
        bridge.nursery.start_soon(stream.pump)
        return stream

    async def _connect(
        self, pid: ID, addrs: list[multiaddr.Multiaddr], circuits: list[multiaddr.Multiaddr], peer: PeerAddr
    ) -> None:
        """Reuse a connection to `pid`, else dial direct addresses (briefly, if a relay is the fallback), then
        circuits."""
        from libp2p.peer.peerinfo import PeerInfo

        host, relay = self._host, self._relay
        assert host is not None and relay is not None
        if host.get_network().connections.get(pid):
            return
        errors: list[str] = []
        if addrs:
            try:
                if circuits:
                    with trio.fail_after(DIRECT_FIRST_TIMEOUT):
                        await host.connect(PeerInfo(pid, addrs))
                else:
                    await host.connect(PeerInfo(pid, addrs))
                return
            except (Exception, trio.TooSlowError) as e:  # noqa: BLE001 - collected into the DialError below
                errors.append(f"direct: {e or type(e).__name__}")
        for circuit in circuits:
            try:
                await relay.dial(circuit)
                if self._upgrade is not None:
                    self._upgrade.relayed_seen.add(peer.peer_id)
                return
            except RelayError as e:
                errors.append(str(e))
        if not errors:
            raise DialError(f"no address to dial peer {peer.peer_id}: pass its multiaddrs in PeerAddr.addrs")
        raise (RelayError if circuits and not addrs else DialError)(
            f"cannot reach peer {peer.peer_id} at {list(peer.addrs)}: {'; '.join(errors)}"
        )

    async def use_relay(self, relay: PeerAddr, timeout: float = 15.0) -> str:
        """Reserve a slot on `relay` (a peer started with relay_service) and return our circuit address through it,
        `<relay addr>/p2p/RELAY/p2p-circuit/p2p/US`, also appended to `listen_addrs` and `circuit_addrs`.

        For daemons that others cannot dial: peers reach us through the relay instead. libp2p refreshes the
        reservation before it expires for as long as the transport runs."""
        if self._bridge is None or self._bridge.token is None:
            raise TransportError("the libp2p transport is not running: call start() first")
        direct = [a for a in relay.addrs if not is_circuit(a)]
        if not direct:
            raise RelayError(
                f"relay {relay.peer_id} needs a direct address (relays cannot be chained): got {relay.addrs}"
            )
        circuit = await self._bridge.run(self._reserve, relay, direct, timeout)
        if circuit not in self.circuit_addrs:
            self.circuit_addrs.append(circuit)
            self.listen_addrs.append(circuit)
        return circuit

    async def _reserve(self, relay: PeerAddr, direct: list[str], timeout: float) -> str:
        bridge = self._bridge
        assert self._relay is not None and bridge is not None and bridge.nursery is not None
        return await self._relay.reserve(relay, direct, self.peer_id, bridge.nursery, timeout)

    def set_relay_service(self, enabled: bool) -> None:
        """Start or stop relaying for others (HOP) on a running transport: a daemon learns only after start
        whether it is publicly reachable, which is what makes it a useful relay."""
        self.relay_service = enabled

        def apply() -> None:
            if self._relay is not None:
                self._relay.set_hop(enabled)

        if self._bridge is not None and self._bridge.token is not None:
            self._bridge.to_trio(apply)

    async def call(self, peer: PeerAddr, protocol_id: str, request: object, timeout: float = 30.0) -> object:
        return await call_over(self, peer, protocol_id, request, timeout)

    # -- introspection -----------------------------------------------------------------------------------------

    def peer_links(self) -> dict[str, dict[str, str]]:
        """How we are connected to each peer: ``{"reach": "direct" | "upgraded" | "relayed", "addr": its address}``
        ("upgraded": direct after first coming through a relay, by DCUtR). Read from the asyncio side: a snapshot
        of the swarm's connection table."""
        if self._host is None or self._thread is None:
            return {}
        try:
            return self._upgrade.links() if self._upgrade is not None else peer_links(self._host, set())
        except RuntimeError:  # the table changed while we read it: the next call gets a clean one
            return {}

    def connection_count(self, peer_id: str) -> int:
        """How many connections we hold to `peer_id` (tests check the one-connection-per-peer rule)."""
        from libp2p.peer.id import ID

        if self._host is None:
            return 0
        return len(self._host.get_network().connections.get(ID.from_base58(peer_id), []))
