"""The router of one daemon: swarm views per model, latency probes (EWMA), bans, and the chain for a request.

It reads the swarm through ``SwarmView`` (``swarm.py``), chooses with the pure policy of ``chains.py`` and makes
the clients of the chosen hops (``remote.py``); sessions and forward/backward calls go through it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.routing.bans import BanList
from petal.daemon.routing.chains import Hop, min_latency_chain, no_route_error, select_servers, throughput_chain
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.routing.swarm import ModelShape, ServerInfo, SwarmView
from petal.protocol.errors import PetalError

log = logging.getLogger("petal.router")

LATENCY_EWMA = 0.3
"""Weight of a new latency sample; the rest is history, so one slow reply does not reroute everything."""
MAX_VIEWS = 16
"""Swarm views a router keeps (least recently used first out): each refreshes in the background and holds its
servers, so a caller naming many models must not make the daemon keep them all."""

MAX_PEERS = 4096
"""Servers a router remembers latencies and limits of; past it the longest unprobed are forgotten (and re-probed
if they are seen again), so forged server records cannot grow the router without bound."""

LocalShape = Callable[[str], Awaitable[ModelShape | None]]
"""The shape of this daemon's own copy of a model (None without one): what DHT records are checked against."""


class Router:
    """Route choice for one daemon: swarm views per model, latency probes (EWMA), bans.

    ``transport`` is the node's libp2p transport (for ``info`` probes and remote spans), ``dht`` its DHT.
    ``local_shape``: the shape of the local copy of a model, if this daemon has one (see ``SwarmView``).
    """

    def __init__(
        self,
        transport: Transport,
        dht: SwarmDHT,
        *,
        period: float = 30.0,
        max_age: float = 10.0,
        probe_timeout: float = 3.0,
        codec: str = "q8",
        bans: BanList | None = None,
        rng: random.Random | None = None,
        local_shape: LocalShape | None = None,
        max_views: int = MAX_VIEWS,
    ) -> None:
        self.transport = transport
        self.dht = dht
        self.period = period
        self.max_age = max_age
        self.probe_timeout = probe_timeout
        self.codec = codec
        self.bans = bans or BanList()
        self.rng = rng or random.Random()
        self.latency: dict[str, float] = {}
        self.limits: dict[str, tuple[int, int]] = {}  # peer -> (max_length, max_batch) its last info announced
        self._probed_at: dict[str, float] = {}
        self.local_shape = local_shape
        self.max_views = max_views
        self._views: OrderedDict[str, SwarmView] = OrderedDict()

    async def view(self, model: str, *, fresh: bool = False) -> SwarmView:
        """The model's swarm view, refreshed if older than ``max_age`` (or at once with ``fresh``).

        A view is kept (and refreshed in the background) only once a refresh found the model, so names the swarm
        does not serve leave nothing behind; at most ``max_views`` are kept, the least recently used leave first.
        """
        view = self._views.get(model)
        if view is None:
            local = await self.local_shape(model) if self.local_shape is not None else None
            view = SwarmView(self.dht, model, period=self.period, local=local)
            await view.refresh()
            kept = self._views.get(model)  # another request may have made one meanwhile: use that one
            if kept is not None:
                self._views.move_to_end(model)
                return kept
            self._views[model] = view
            view.start()
            while len(self._views) > self.max_views:
                _, old = self._views.popitem(last=False)
                await old.stop()
            return view
        self._views.move_to_end(model)
        if fresh or view.stale(self.max_age):
            await view.refresh()
        return view

    @property
    def views(self) -> int:
        """How many swarm views this router keeps (for status and tests)."""
        return len(self._views)

    async def refresh(self, model: str) -> SwarmView:
        return await self.view(model, fresh=True)

    def ban(self, peer_id: str, reason: object = "") -> None:
        length = self.bans.ban(peer_id)
        log.info("banning server %s for %.0f s: %s", peer_id, length, reason)

    def is_banned(self, peer_id: str) -> bool:
        return self.bans.is_banned(peer_id)

    def record_latency(self, peer_id: str, seconds: float) -> None:
        old = self.latency.get(peer_id)
        self.latency[peer_id] = seconds if old is None else (1 - LATENCY_EWMA) * old + LATENCY_EWMA * seconds
        self._probed_at[peer_id] = time.monotonic()
        if len(self._probed_at) > MAX_PEERS:
            for old_peer in sorted(self._probed_at, key=self._probed_at.__getitem__)[: len(self._probed_at) // 4]:
                self._probed_at.pop(old_peer, None)
                self.latency.pop(old_peer, None)
                self.limits.pop(old_peer, None)

    async def probe(self, model: str, server: ServerInfo) -> float | None:
        """Time one ``info`` round trip; a server that does not answer is banned and gets None."""
        remote = RemoteSpan(self.transport, server.peer, model, "", server.start, server.end, self.codec)
        t0 = time.perf_counter()
        try:
            info = await remote.info(timeout=self.probe_timeout)
        except PetalError as e:  # an error frame, or a malformed info: not a server to route through
            self.ban(server.peer_id, f"info probe answered {e}")
            return None
        except Exception as e:  # noqa: BLE001 - any failure to answer means "do not route through it now"
            self.ban(server.peer_id, f"info probe failed: {e}")
            return None
        seconds = time.perf_counter() - t0
        self.record_latency(server.peer_id, seconds)
        self.limits[server.peer_id] = (info.max_length, info.max_batch)
        return seconds

    def fits(self, peer_id: str, max_length: int, batch: int) -> bool:
        """Whether the server's announced limits (if it announced any) allow a session of this size."""
        most_length, most_batch = self.limits.get(peer_id, (0, 0))
        return (not most_length or max_length <= most_length) and (not most_batch or batch <= most_batch)

    async def probe_all(self, model: str, servers: Iterable[ServerInfo], max_age: float | None = None) -> None:
        """Probe, concurrently, every server whose latency is unknown or older than ``max_age`` (default: period)."""
        limit = self.period if max_age is None else max_age
        now = time.monotonic()
        todo = [s for s in servers if now - self._probed_at.get(s.peer_id, -math.inf) > limit]
        if todo:
            await asyncio.gather(*(self.probe(model, s) for s in todo))

    def span(self, view: SwarmView, hop: Hop, codec: str | None = None) -> RemoteSpan:
        """The client of ``hop`` (a sub-range of a server's span) of ``view``'s model."""
        return RemoteSpan(
            self.transport, hop.server.peer, view.model, view.fingerprint or "", hop.start, hop.end, codec or self.codec
        )

    def candidates(
        self, view: SwarmView, allowed: Iterable[str] | None = None, blocked: Iterable[str] | None = None
    ) -> list[ServerInfo]:
        return select_servers(view.servers.values(), self.bans, allowed, blocked)

    def _check_range(self, view: SwarmView, start: int, end: int | None) -> tuple[int, int]:
        n = view.num_blocks or 0
        end = n if end is None else end
        if not 0 <= start < end <= n:
            raise PetalError("bad_request", f"block range [{start}, {end}) is outside {view.model}'s {n} blocks")
        return start, end

    async def inference_chain(
        self,
        model: str,
        start: int = 0,
        end: int | None = None,
        *,
        allowed: Iterable[str] | None = None,
        blocked: Iterable[str] | None = None,
    ) -> list[Hop]:
        """The minimum-latency chain for [start, end) (the whole model by default), probing servers first."""

        async def pick(usable: list[ServerInfo], a: int, b: int) -> list[Hop] | None:
            usable = [s for s in usable if s.start < b and s.end > a]
            await self.probe_all(model, usable)
            return min_latency_chain([s for s in usable if not self.is_banned(s.peer_id)], a, b, self.latency)

        return await self._route(model, start, end, allowed, blocked, pick)

    async def throughput_chain(
        self,
        model: str,
        start: int = 0,
        end: int | None = None,
        *,
        allowed: Iterable[str] | None = None,
        blocked: Iterable[str] | None = None,
    ) -> list[Hop]:
        """A throughput-weighted random chain for [start, end) (forward/backward)."""

        async def pick(usable: list[ServerInfo], a: int, b: int) -> list[Hop] | None:
            return throughput_chain(usable, a, b, self.rng)

        return await self._route(model, start, end, allowed, blocked, pick)

    async def _route(
        self,
        model: str,
        start: int,
        end: int | None,
        allowed: Iterable[str] | None,
        blocked: Iterable[str] | None,
        pick: Callable[[list[ServerInfo], int, int], Awaitable[list[Hop] | None]],
    ) -> list[Hop]:
        """Ask `pick` for a chain over the usable servers; once more after a fresh DHT read (servers may have
        joined since the last refresh); else a clear error naming what the swarm has."""
        view = await self.view(model)
        start, end = self._check_range(view, start, end)
        for attempt in range(2):
            usable = self.candidates(view, allowed, blocked)
            chain = await pick(usable, start, end)
            if chain is not None:
                return chain
            if attempt == 0:
                view = await self.view(model, fresh=True)
        raise no_route_error(model, start, end, usable, list(view.servers.values()))

    async def close(self) -> None:
        for view in self._views.values():
            await view.stop()
        self._views.clear()
