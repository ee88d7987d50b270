"""One petald node: identity, libp2p transport, DHT, what it hosts and the control socket, started and stopped
together, plus the re-announcing of everything it publishes in the DHT."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petal.daemon.api.app import ControlServer
from petal.daemon.config import Config, ConfigError, parse_http_address, prepare_socket_dir
from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.daemon.net.addrs import parse_multiaddr
from petal.daemon.net.composite import CompositeTransport
from petal.daemon.net.dialback import DIALBACK_PROTOCOL, check_reachability, serve_dialback
from petal.daemon.net.direct import DirectTransport
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.relay import RelayKeeper
from petal.daemon.net.transport import PeerAddr, Stream, TransportError
from petal.daemon.startup import StartupError, bind_error, is_ip, load_identity, probe_bind, unix_socket_alive
from petal.daemon.systemd import ExitCode, sd_notify, watchdog_period
from petal.protocol import PROTOCOL_VERSION
from petal.protocol.records import check_announcement

if TYPE_CHECKING:  # serving loads torch: a daemon that hosts nothing answers and is ready without it (`host`)
    from petal.daemon.serving.host import Host

log = logging.getLogger("petal.node")

NODE_INFO_PROTOCOL = "/petal/node-info/1"


STATUS_CHECK_S = 5.0
"""How often the systemd STATUS= line is recomputed (it is sent when it changed, and every STATUS_REFRESH_S)."""
STATUS_REFRESH_S = 60.0


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
        self.transport: Libp2pTransport | CompositeTransport
        self.transport = Libp2pTransport(self.identity, self.config.listen, relay_service=self.config.relay)
        direct = self.config.direct_listen()
        if direct:  # block traffic over TLS/TCP to peers that offer it (petal.daemon.net.composite)
            self.transport = CompositeTransport(self.transport, DirectTransport(self.identity, direct))
        self._dht: DHT | None = None
        self._host: Host | None = None
        self.control: ControlServer | None = None
        self.reachable: bool | None = None  # can others dial our listen port? (None: not checked yet)
        self._helpers: list[PeerAddr] = []  # initial peers that answered at start (relay candidates)
        self.relay_keeper: RelayKeeper | None = None  # set once we are reached through a relay
        self._phase: str | None = "starting"  # what start() is doing (systemd's STATUS=); None once ready
        self._status_sent: str | None = None
        self._status_sent_at = 0.0

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
        """What this daemon serves (`Host.serve`, `Host.unserve`); made (importing torch) when first asked for."""
        if self._host is None:
            if self._dht is None:
                raise RuntimeError("the node is not started yet; await node.start() first")
            self._host = self._make_host(self._dht)
        return self._host

    def _make_host(self, dht: DHT) -> Host:
        from petal.daemon.serving.host import Host  # start-up: torch loads when the daemon first serves
        from petal.daemon.serving.settings import settings_from_config  # start-up: as above

        return Host(
            transport=self.transport,
            dht=dht,
            announcer=self,
            peer_id=self.peer_id,
            settings=settings_from_config(self.config),
            state_dir=Path(self.config.state_dir),
            rebalance_period=self.config.rebalance_period,
        )

    async def start(self) -> None:
        """Listen, join the swarm, serve what the config says and open the control socket; sends READY=1.

        Every failure the user can fix raises StartupError with a one-line message and an ExitCode."""
        t0 = time.monotonic()
        if os.environ.get("NOTIFY_SOCKET"):
            self._tasks.append(asyncio.create_task(self._systemd_loop(), name="systemd"))
        self._set_phase("starting: listening")
        await self._start_transport()
        self.transport.set_handler(NODE_INFO_PROTOCOL, self._serve_node_info)
        self.transport.set_handler(DIALBACK_PROTOCOL, serve_dialback)
        first = parse_multiaddr(self.transport.listen_addrs[0])
        host = parse_multiaddr(self.config.listen[0]).host
        self._set_phase("starting: joining the swarm")
        bootstrap, helpers = await self._resolve_initial_peers()
        self._helpers = helpers
        if helpers:
            await self._check_reachability(helpers[0])
        port = self.config.dht_port if self.config.dht_port is not None else first.port
        self._dht = dht = await self._start_dht(host, port, bootstrap)
        if bootstrap and dht.routing_table_size() == 0:
            raise StartupError(
                f"joined no DHT peers from {', '.join(self.config.initial_peers)}: check that those daemons run and "
                "that their UDP DHT port is reachable",
                ExitCode.NETWORK,
            )
        specs = self.config.serve_specs()
        for serve, blocks in specs:  # with several models, each adapter is hosted on the spans it fits
            await self._serve_at_start(serve, blocks, strict=len({model for model, _ in specs}) == 1)
        hosted = {name for server in (self.host.servers() if specs else []) for name in server.adapters}
        if unfit := [name for name, _ in self.config.adapter_dirs() if name not in hosted]:
            raise StartupError(
                f"--adapter {', '.join(unfit)} fits none of the served models' layers; check which model it was "
                "trained for (its adapter_config.json) and serve that one",
                ExitCode.MODEL,
            )
        self._set_phase("starting: opening the control socket")
        await self._start_control()
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
        self._phase = None
        self._notify_status("READY=1")

    async def _start_transport(self) -> None:
        """Start libp2p on --listen; a bad address is ExitCode.USAGE, a taken port ExitCode.IN_USE.

        Each address is bound once beforehand: libp2p only logs a listener that failed and carries on with the
        others, so a daemon with one bad --listen of two would start without the address it was asked for."""
        for addr in self.config.listen:
            try:
                hp = parse_multiaddr(addr)
            except ValueError as e:
                raise StartupError(f"--listen: {e}", ExitCode.USAGE) from None
            proto = addr.strip().split("/")[1]
            if hp.transport != "tcp" or hp.peer_id or not is_ip(hp.host, proto):
                raise StartupError(
                    f"--listen {addr!r}: use /ip4/ADDRESS/tcp/PORT (or /ip6/...), e.g. /ip4/0.0.0.0/tcp/31330",
                    ExitCode.USAGE,
                )
            if (failure := probe_bind(hp.host, hp.port)) is not None:
                raise bind_error(f"TCP port {hp.port} on {hp.host} (--listen {addr})", failure, "--listen port")
        if direct := self.config.direct_listen():
            host, _, port = direct.rpartition(":")
            if (failure := probe_bind(host.strip("[]"), int(port))) is not None:
                raise bind_error(f"TCP port {port} on {host} (--direct)", failure, "--direct port")
        try:
            await self.transport.start()
        except TransportError as e:
            raise self._listen_failure(e) from e
        if not self.transport.listen_addrs:  # libp2p logs a listener that failed and carries on without it
            raise self._listen_failure(None)

    def _listen_failure(self, error: TransportError | None) -> StartupError:
        """Why libp2p could not listen: bind each --listen address ourselves to find the errno."""
        for addr in self.config.listen:
            hp = parse_multiaddr(addr)
            if (failure := probe_bind(hp.host, hp.port)) is not None:
                return bind_error(f"TCP port {hp.port} on {hp.host} (--listen {addr})", failure, "--listen port")
        detail = f" ({error})" if error else ""
        return StartupError(
            f"libp2p could not listen on {', '.join(self.config.listen)}{detail}: check --listen", ExitCode.USAGE
        )

    async def _start_control(self) -> None:
        """Open the control socket (and --http); sorts a failure into its ExitCode (ControlServer says what)."""
        try:  # check the socket's directory before connecting to anything in it (an impostor may listen there)
            prepare_socket_dir(Path(self.config.socket))
        except ConfigError as e:
            raise StartupError(str(e), ExitCode.STATE) from e
        if unix_socket_alive(Path(self.config.socket)):
            raise StartupError(
                f"another petald already listens on {self.config.socket}: stop it (`petalctl status` shows it) "
                "or give this one its own --socket",
                ExitCode.IN_USE,
            )
        self.control = ControlServer(self, lazy=not self.config.serve)  # a server has torch loaded already
        try:
            await self.control.start()
        except (ConfigError, OSError) as e:
            if self.config.http:
                host, port = parse_http_address(self.config.http)
                if (bound := probe_bind(host, port)) is not None:
                    raise bind_error(f"--http {self.config.http}", bound, "--http address") from e
            if isinstance(e, OSError):
                raise StartupError(
                    f"cannot open the control socket {self.config.socket} ({e.strerror or e}): pass --socket in a "
                    "directory this user can write",
                    ExitCode.STATE,
                ) from e
            raise StartupError(str(e), ExitCode.STATE) from e

    async def _serve_at_start(self, serve: str, blocks: str | None, strict: bool = True) -> None:
        """Load and serve a span configured at startup (--serve, --blocks / --num-blocks, --adapter)."""
        from petal.daemon.serving.errors import ServeError  # start-up: loads torch, needed only to serve

        config = self.config
        self._set_phase(f"starting: loading {serve}")
        try:
            plan = await self.host.plan(serve, blocks=blocks, num_blocks=None if blocks else config.num_blocks)
            self._set_phase(f"starting: loading {plan.info.name} blocks {plan.start}:{plan.end}")
            await self.host.serve(plan, adapters=config.adapter_dirs(), strict=strict)
        except ServeError as e:
            raise StartupError(str(e), ExitCode.MODEL) from e
        except Exception as e:  # torch, safetensors and the loaders raise many types; all mean "cannot serve this"
            raise StartupError(
                f"cannot load {serve} to serve it ({type(e).__name__}: {e}); check the model dir, --device, --dtype "
                "and free memory (--log-level debug shows the traceback)",
                ExitCode.MODEL,
            ) from e

    async def _start_dht(self, host: str, port: int, bootstrap: list[tuple[str, int]]) -> DHT:
        """Listen on UDP `port` (by default the libp2p TCP port's number); fall back to an ephemeral one if taken."""
        dht = DHT(self.identity, host=host, port=port)
        try:
            await dht.start(bootstrap)
            return dht
        except OSError as e:
            if self.config.dht_port is not None or e.errno != errno.EADDRINUSE:
                raise bind_error(f"UDP port {port} on {host} for the DHT", e, "--dht-port") from e
            log.warning("UDP port %d is taken (%s); the DHT uses an ephemeral port instead", port, e)
        dht = DHT(self.identity, host=host, port=0)
        try:
            await dht.start(bootstrap)
        except OSError as e:
            raise bind_error(f"a UDP port on {host} for the DHT", e, "--dht-port") from e
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
                raise StartupError(f"--initial-peer: {e}", ExitCode.USAGE) from None
            if hp.transport == "udp":  # a bare DHT address: use as is
                found.append((hp.host, hp.port))
                continue
            if not hp.peer_id:
                raise StartupError(
                    f"initial peer {addr!r} lacks /p2p/PEER_ID: copy the full address petald printed", ExitCode.USAGE
                )
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
                "check the addresses, that those daemons are running and that their TCP port is reachable from here",
                ExitCode.NETWORK,
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
        self.relay_keeper = keeper = RelayKeeper(
            self.transport, self._probe_relay, self._relay_candidates, self._relayed
        )
        keeper.relay, keeper.circuit = helper, circuit
        self._tasks.append(asyncio.create_task(keeper.run(), name="relay-keeper"))

    async def _probe_relay(self, relay: PeerAddr) -> object:
        return await self.transport.call(relay, NODE_INFO_PROTOCOL, {}, timeout=5.0)

    async def _relay_candidates(self) -> list[PeerAddr]:
        """Peers that may relay for us once our relay is gone: the initial peers that answered at start."""
        return list(self._helpers)

    async def _relayed(self) -> None:
        """Our circuit address changed: announce our servers with it."""
        if self._host is not None:
            for server in self._host.servers():
                await server.republish()

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
            "links": self.transport.peer_links() if hasattr(self.transport, "peer_links") else {},
            "socket": str(self.config.socket),
            "public_name": self.config.public_name,
            "serving": self._host.status() if self._host else [],  # never makes a Host: torch stays unloaded
        }

    def status_line(self) -> str:
        """One line for systemd's STATUS= (`systemctl status petald`): what start() does, or what we serve."""
        if self._phase is not None:
            return self._phase
        peers = self._dht.routing_table_size() if self._dht else 0
        peers_text = f"{peers} peer{'' if peers == 1 else 's'}"
        served = self._host.status() if self._host else []
        if served:
            spans = "; ".join(f"serving {s['model']} blocks {s['start']}:{s['end']}" for s in served)
            sessions = sum(int(s["sessions"]) for s in served)
            line = f"{spans}, {peers_text}, {sessions} session{'' if sessions == 1 else 's'}"
        else:
            line = f"client only, {peers_text}"
        if self.reachable is False:
            line += ", not reachable by others"
        return line

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        self._notify_status()

    def _notify_status(self, *states: str, watchdog: bool = False) -> None:
        """Send `states` (READY=1...), WATCHDOG=1 if asked, and STATUS= when it changed or went stale; one datagram."""
        lines = list(states)
        if watchdog:
            lines.append("WATCHDOG=1")
        try:
            status = self.status_line()
        except Exception as e:  # noqa: BLE001 - a status line must never stop the watchdog pings
            log.debug("no status line: %s", e)
            status = None
        now = time.monotonic()
        if status is not None and (
            states or status != self._status_sent or now - self._status_sent_at >= STATUS_REFRESH_S
        ):
            lines.append(f"STATUS={status}")
            self._status_sent, self._status_sent_at = status, now
        if lines:
            sd_notify("\n".join(lines))

    async def _systemd_loop(self) -> None:
        """Keep systemd informed: STATUS= on every change (checked every STATUS_CHECK_S) and WATCHDOG=1 every half
        WatchdogSec=. The pings come from this event loop, so a loop that hangs stops them and systemd restarts us."""
        period = watchdog_period()
        tick = min(STATUS_CHECK_S, period) if period else STATUS_CHECK_S
        if period:
            log.info("systemd watchdog: pinging every %.3g s", period)
        while True:
            self._notify_status(watchdog=period is not None)
            await asyncio.sleep(tick)

    async def announce(self, key: str, value: dict[str, Any]) -> int:
        """Announce under `key` now and keep re-announcing until withdrawn or stopped.

        A value the DHT cannot sign raises RecordError here and is never kept (nor re-announced)."""
        check_announcement(key, value)
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

    def notify_stopping(self) -> None:
        """Tell systemd (once) that we are stopping: STOPPING=1 with STATUS=stopping."""
        if self._phase != "stopping":
            self._phase = "stopping"
            self._notify_status("STOPPING=1")

    async def drain(self) -> None:
        """Announce leaving, let open sessions finish (bounded), then stop serving; nothing if never serving."""
        if self._host is not None:
            await self._host.stop(drain=True)

    async def stop(self) -> None:
        self.notify_stopping()
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
    """Run until SIGTERM or SIGINT, then shut down cleanly; a start that fails raises StartupError (with its code)."""
    node = Node(config, load_identity(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        await stop.wait()
        log.info("signal received, shutting down")
        node.notify_stopping()  # systemd knows at once; the drain below may take up to drain_timeout
        await node.drain()
    finally:
        await node.stop()
