"""One petald node: identity, libp2p transport, DHT and control socket, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from petal.daemon.config import Config
from petal.daemon.identity import Identity
from petal.daemon.net.addrs import parse_multiaddr
from petal.daemon.systemd import sd_notify
from petal.protocol import PROTOCOL_VERSION

log = logging.getLogger("petal.node")

NODE_INFO_PROTOCOL = "/petal/node-info/1"
MAX_ANNOUNCED_VALUE_BYTES = 2048


class StartupError(RuntimeError):
    """The node could not start; the message says what to change."""


class Node:
    """Owns the long-lived parts of a daemon. Later parts (block servers, router) hang off this object."""

    def __init__(self, config: Config, identity: Identity | None = None) -> None:
        self.config = config
        self.identity = identity or Identity.load_or_create(config.state_dir)
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._announced: dict[str, dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.transport: Any = None
        self.dht: Any = None
        self.control: Any = None
        self.servers: list[Any] = []  # block servers hosted by this daemon (petal.daemon.serving.server)
        self.reachable: bool | None = None  # can others dial our listen port? (None: not checked yet)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def start(self) -> None:
        from petal.daemon.api.app import ControlServer
        from petal.daemon.net.p2p import DIALBACK_PROTOCOL, Libp2pTransport, serve_dialback

        t0 = time.monotonic()
        self.transport = Libp2pTransport(self.identity, self.config.listen, relay_service=self.config.relay)
        await self.transport.start()
        self.transport.set_handler(NODE_INFO_PROTOCOL, self._serve_node_info)
        self.transport.set_handler(DIALBACK_PROTOCOL, serve_dialback)
        first = parse_multiaddr(self.transport.listen_addrs[0])
        host = parse_multiaddr(self.config.listen[0]).host
        bootstrap, helpers = await self._resolve_initial_peers()
        if helpers:
            await self._check_reachability(helpers[0])
        port = self.config.dht_port if self.config.dht_port is not None else first.port
        self.dht = await self._start_dht(host, port, bootstrap)
        if bootstrap and self.dht.routing_table_size() == 0:
            raise StartupError(
                f"joined no DHT peers from {', '.join(self.config.initial_peers)}: check that those daemons run and "
                "that their UDP DHT port is reachable"
            )
        if self.config.serve:
            from petal.daemon.serving.server import (
                start_serving,
            )  # the block server (only for daemons that host blocks)

            self.servers = await start_serving(self)
        self.control = ControlServer(self)
        await self.control.start()
        self._tasks.append(asyncio.create_task(self._reannounce_loop(), name="reannounce"))
        self.ready.set()
        log.info(
            "ready in %.2f s: peer %s, dht udp port %d, socket %s",
            time.monotonic() - t0,
            self.peer_id,
            self.dht.port,
            self.config.socket,
        )
        for addr in self.transport.listen_addrs:
            log.info("others can join with: petald --initial-peer %s", addr)
        sd_notify(f"READY=1\nSTATUS=serving on {self.config.socket}")

    async def _start_dht(self, host: str, port: int, bootstrap: list[tuple[str, int]]):  # -> DHT
        """Listen on UDP `port` (by default the libp2p TCP port's number); fall back to an ephemeral one if taken."""
        from petal.daemon.dht.network import DHT

        dht = DHT(self.identity, host=host, port=port)
        try:
            await dht.start(bootstrap)
            return dht
        except OSError as e:
            if self.config.dht_port is not None:
                raise StartupError(
                    f"cannot listen on UDP port {port} for the DHT ({e}); choose another --dht-port"
                ) from e
            log.warning("UDP port %d is taken (%s); the DHT uses an ephemeral port instead", port, e)
        dht = DHT(self.identity, host=host, port=0)
        await dht.start(bootstrap)
        return dht

    async def _resolve_initial_peers(self) -> tuple[list[tuple[str, int]], list[Any]]:
        """Each initial peer is a libp2p address; ask it (over libp2p) which UDP port its DHT listens on.

        Returns the DHT bootstrap addresses and the peers that answered (PeerAddr; they can dial us back).
        """
        from petal.daemon.net.transport import PeerAddr

        found: list[tuple[str, int]] = []
        helpers: list[PeerAddr] = []
        for addr in self.config.initial_peers:
            try:
                hp = parse_multiaddr(addr)
            except ValueError as e:
                raise StartupError(str(e)) from None
            if hp.transport == "udp":  # a bare DHT address: use as is
                found.append((hp.host, hp.port))
                continue
            if not hp.peer_id:
                raise StartupError(f"initial peer {addr!r} lacks /p2p/PEER_ID: copy the full address petald printed")
            try:
                peer = PeerAddr(hp.peer_id, (addr,))
                info = await self.transport.call(peer, NODE_INFO_PROTOCOL, {}, timeout=10.0)
                found.append((hp.host, int(info["dht_port"])))
                helpers.append(peer)
            except Exception as e:  # noqa: BLE001 - one dead bootstrap peer must not stop the others
                log.warning("initial peer %s did not answer (%s); trying the others", addr, e)
        if self.config.initial_peers and not found:
            raise StartupError(
                f"none of the initial peers answered ({', '.join(self.config.initial_peers)}): "
                "check the addresses and that those daemons are running"
            )
        return found, helpers

    async def _check_reachability(self, helper) -> None:
        """Ask a peer to dial our listen port back (libp2p's AutoNAT v1 here reports dead ports as reachable)."""
        from petal.daemon.net.p2p import check_reachability

        try:
            answer = await check_reachability(self.transport, helper)
        except Exception as e:  # noqa: BLE001 - reachability is advice, not a reason to stop
            log.warning("could not check whether others can reach us: %s", e)
            return
        self.reachable = any(r.get("reachable") for r in answer["results"])
        if not self.reachable:
            log.warning(
                "peer %s could not connect back to %s: others cannot reach this daemon, so it can use the swarm "
                "but should not serve blocks; open the TCP port in your firewall or forward it",
                helper.peer_id,
                ", ".join(self.transport.listen_addrs),
            )
            if self.config.relay:
                await self._reach_through_relay(helper)

    async def _reach_through_relay(self, helper) -> None:
        """Unreachable: stop offering relay service (nobody could use it) and reserve a slot on `helper` instead;
        the circuit address joins transport.listen_addrs, so node-info and block announcements carry it."""
        self.transport.set_relay_service(False)
        try:
            circuit = await self.transport.use_relay(helper)
        except Exception as e:  # noqa: BLE001 - without a relay we still use the swarm, we just cannot serve
            log.warning(
                "peer %s cannot relay for us either (%s): others still cannot reach this daemon", helper.peer_id, e
            )
            return
        log.info("others reach this daemon through relay %s at %s", helper.peer_id, circuit)

    async def _serve_node_info(self, stream) -> None:
        await stream.recv(timeout=10.0)
        await stream.send(self.node_info())

    def node_info(self) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "peer_id": self.peer_id,
            "addrs": list(self.transport.listen_addrs) if self.transport else [],
            "dht_port": self.dht.port if self.dht else None,
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.node_info(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "dht_peers": self.dht.routing_table_size() if self.dht else 0,
            "announced": sorted(self._announced),
            "reachable": self.reachable,
            "socket": str(self.config.socket),
        }

    async def announce(self, key: str, value: dict[str, Any]) -> int:
        """Announce under `key` now and keep re-announcing until withdrawn or stopped."""
        self._announced[key] = value
        return await self.dht.announce(key, value, ttl=self.config.announce_ttl)

    async def withdraw(self, key: str) -> None:
        self._announced.pop(key, None)
        await self.dht.withdraw(key)

    async def _reannounce_loop(self) -> None:
        period = self.config.announce_ttl / 3
        while True:
            await asyncio.sleep(period)
            for key, value in list(self._announced.items()):
                try:
                    await self.dht.announce(key, value, ttl=self.config.announce_ttl)
                except Exception as e:  # noqa: BLE001 - keep the loop alive; the next round retries
                    log.warning("re-announcing %s failed: %s", key, e)

    async def stop(self) -> None:
        sd_notify("STOPPING=1")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.control:
            await self.control.stop()
        for server in reversed(self.servers):  # managers (the rebalancer) before the servers they manage
            await server.stop()
        if self.dht:
            for key in list(self._announced):
                try:
                    await asyncio.wait_for(self.dht.withdraw(key), timeout=3.0)
                except Exception as e:  # noqa: BLE001 - the entry still expires on its own
                    log.info("could not withdraw %s (%s); it expires within %.0f s", key, e, self.config.announce_ttl)
            await self.dht.stop()
        if self.transport:
            await self.transport.stop()
        log.info("stopped")


async def run_node(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await node.stop()
