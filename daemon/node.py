"""One petald node: identity, libp2p transport, DHT, what it hosts and the control socket, started and stopped
together, plus the re-announcing of everything it publishes in the DHT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

from petal.daemon.api.app import ControlServer
from petal.daemon.config import Config
from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.daemon.net.addrs import parse_multiaddr
from petal.daemon.net.dialback import DIALBACK_PROTOCOL, check_reachability, serve_dialback
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import PeerAddr, Stream
from petal.daemon.serving.errors import ServeError
from petal.daemon.serving.host import Host
from petal.daemon.serving.settings import settings_from_config
from petal.daemon.systemd import sd_notify
from petal.protocol import PROTOCOL_VERSION

log = logging.getLogger("petal.node")

NODE_INFO_PROTOCOL = "/petal/node-info/1"


class StartupError(RuntimeError):
    """The node could not start; the message says what to change."""


class Node:
    """Owns the long-lived parts of a daemon: transport, DHT, `host` (what it serves) and the control socket.

    `dht` and `host` exist from `start` on (before, reading them is a bug and raises RuntimeError).
    """

    def __init__(self, config: Config, identity: Identity | None = None) -> None:
        self.config = config
        self.identity = identity or Identity.load_or_create(config.state_dir)
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._announced: dict[str, dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.transport = Libp2pTransport(self.identity, self.config.listen, relay_service=self.config.relay)
        self._dht: DHT | None = None
        self._host: Host | None = None
        self.control: ControlServer | None = None
        self.reachable: bool | None = None  # can others dial our listen port? (None: not checked yet)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def dht(self) -> DHT:
        if self._dht is None:
            raise RuntimeError("the node's DHT is not started yet; await node.start() first")
        return self._dht

    @property
    def host(self) -> Host:
        """What this daemon serves (`Host.serve`, `Host.unserve`)."""
        if self._host is None:
            raise RuntimeError("the node is not started yet; await node.start() first")
        return self._host

    async def start(self) -> None:
        t0 = time.monotonic()
        await self.transport.start()
        self.transport.set_handler(NODE_INFO_PROTOCOL, self._serve_node_info)
        self.transport.set_handler(DIALBACK_PROTOCOL, serve_dialback)
        first = parse_multiaddr(self.transport.listen_addrs[0])
        host = parse_multiaddr(self.config.listen[0]).host
        bootstrap, helpers = await self._resolve_initial_peers()
        if helpers:
            await self._check_reachability(helpers[0])
        port = self.config.dht_port if self.config.dht_port is not None else first.port
        self._dht = dht = await self._start_dht(host, port, bootstrap)
        if bootstrap and dht.routing_table_size() == 0:
            raise StartupError(
                f"joined no DHT peers from {', '.join(self.config.initial_peers)}: check that those daemons run and "
                "that their UDP DHT port is reachable"
            )
        self._host = Host(
            transport=self.transport,
            dht=dht,
            announcer=self,
            peer_id=self.peer_id,
            settings=settings_from_config(self.config),
            state_dir=Path(self.config.state_dir),
            rebalance_period=self.config.rebalance_period,
        )
        if self.config.serve:
            await self._serve_at_start(self.config.serve)
        self.control = ControlServer(self)
        await self.control.start()
        self._tasks.append(asyncio.create_task(self._reannounce_loop(), name="reannounce"))
        self.ready.set()
        log.info(
            "ready in %.2f s: peer %s, dht udp port %d, socket %s",
            time.monotonic() - t0,
            self.peer_id,
            dht.port,
            self.config.socket,
        )
        for addr in self.transport.listen_addrs:
            log.info("others can join with: petald --initial-peer %s", addr)
        sd_notify(f"READY=1\nSTATUS=serving on {self.config.socket}")

    async def _serve_at_start(self, serve: str) -> None:
        """Load and serve the span configured at startup (--serve, --blocks / --num-blocks)."""
        config = self.config
        try:
            plan = await self.host.plan(serve, blocks=config.blocks, num_blocks=config.num_blocks)
        except ServeError as e:
            raise StartupError(str(e)) from None
        await self.host.serve(plan)

    async def _start_dht(self, host: str, port: int, bootstrap: list[tuple[str, int]]) -> DHT:
        """Listen on UDP `port` (by default the libp2p TCP port's number); fall back to an ephemeral one if taken."""
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

    async def _resolve_initial_peers(self) -> tuple[list[tuple[str, int]], list[PeerAddr]]:
        """Each initial peer is a libp2p address; ask it (over libp2p) which UDP port its DHT listens on.

        Returns the DHT bootstrap addresses and the peers that answered (PeerAddr; they can dial us back).
        """
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
                if not isinstance(info, dict):
                    raise TypeError(f"its node-info reply is not a map: {info!r:.80}")
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

    async def _check_reachability(self, helper: PeerAddr) -> None:
        """Ask a peer to dial our listen port back (libp2p's AutoNAT v1 here reports dead ports as reachable)."""
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

    async def _reach_through_relay(self, helper: PeerAddr) -> None:
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

    async def _serve_node_info(self, stream: Stream) -> None:
        await stream.recv(timeout=10.0)
        await stream.send(self.node_info())

    def node_info(self) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "peer_id": self.peer_id,
            "addrs": list(self.transport.listen_addrs),
            "dht_port": self._dht.port if self._dht else None,
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.node_info(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "dht_peers": self._dht.routing_table_size() if self._dht else 0,
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
        if self._host:
            await self._host.stop()
        if self._dht:
            for key in list(self._announced):
                try:
                    await asyncio.wait_for(self._dht.withdraw(key), timeout=3.0)
                except Exception as e:  # noqa: BLE001 - the entry still expires on its own
                    log.info("could not withdraw %s (%s); it expires within %.0f s", key, e, self.config.announce_ttl)
            await self._dht.stop()
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
