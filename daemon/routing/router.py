"""The router of one daemon: swarm views per model, latency probes (EWMA), bans, and the chain for a request.

It reads the swarm through ``SwarmView`` (``swarm.py``), chooses with the pure policy of ``chains.py`` and makes
the clients of the chosen hops (``remote.py``); sessions and forward/backward calls go through it.

It also picks each hop's wire codec. With ``auto`` (the default) a hop gets ``none`` (exact float32: greedy output
equals a local run) unless the link to its server was measured slower than ``slow_link_mbit``; then ``q8``. The
measure: an ``info`` probe of a server not on this host is followed (at most every ``BANDWIDTH_PERIOD``) by a
second ``info`` request carrying ``BANDWIDTH_PROBE_BYTES`` of padding, and the extra time it takes gives the upload
bandwidth; the router keeps the best of the last few samples (noise only ever makes a link look slower). Servers
whose every address is loopback are on this host: never slow, not measured. An unmeasured link counts as fast
(lossless until proven slow).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.routing.bans import BanList
from petal.daemon.routing.chains import (
    DEFAULT_LATENCY,
    PIPELINE_MIN_TOKENS,
    Hop,
    min_latency_chain,
    no_route_error,
    select_servers,
    throughput_chain,
)
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.routing.spotcheck import LocalForward, SpotChecker, read_reports
from petal.daemon.routing.swarm import ModelShape, ServerInfo, SwarmView
from petal.protocol.errors import PetalError
from petal.protocol.messages import AUTO_CODEC, CODEC_CHOICES, INFO_PROTOCOL, LOSSLESS_CODEC, SLOW_LINK_CODEC

log = logging.getLogger("petal.router")

LATENCY_EWMA = 0.3
"""Weight of a new latency sample; the rest is history, so one slow reply does not reroute everything."""
MAX_VIEWS = 16
"""Swarm views a router keeps (least recently used first out): each refreshes in the background and holds its
servers, so a caller naming many models must not make the daemon keep them all."""

MAX_PEERS = 4096
"""Servers a router remembers latencies and limits of; past it the longest unprobed are forgotten (and re-probed
if they are seen again), so forged server records cannot grow the router without bound."""

SLOW_LINK_MBIT = 100.0
"""Default threshold of the ``auto`` codec: a link measured below this many Mbit/s gets q8, a faster one none."""
BANDWIDTH_PROBE_BYTES = 256 * 1024
"""Padding of the bandwidth probe: long enough that its transfer time stands out from a round trip's jitter on links
near the threshold (about 20 ms at 100 Mbit/s), short enough to cost nothing on a fast one."""
BANDWIDTH_SAMPLES = 4
"""Bandwidth samples kept per server; the estimate is the best of them."""
FIRST_BANDWIDTH_SAMPLES = 2
"""Samples taken the first time a link is measured: one sample on a busy machine can read a fast link as slow (1 in
40 on loopback libp2p with other work running, docs/benchmarks.md), and it would stand for ``BANDWIDTH_PERIOD``."""
BANDWIDTH_PERIOD = 300.0
"""Seconds between bandwidth probes of one server (latency probes come every ``period``): links change slowly, and
a router that routes over many servers must not upload much just to measure."""


REPORT_PENALTY = 0.05
"""Seconds of latency a route choice adds for each distinct client that reported a server for wrong activations."""
MAX_REPORT_PENALTIES = 4
"""Reports counted per server at most: a flood of fake reporters cannot push a server out of every route."""


def auto_codec(bandwidth_bps: float | None, slow_link_mbit: float = SLOW_LINK_MBIT) -> str:
    """The ``auto`` rule for one hop: ``q8`` on a link measured slower than ``slow_link_mbit`` (bits/s given),
    ``none`` on a faster one or one not measured (yet): lossless unless proven slow."""
    if bandwidth_bps is not None and bandwidth_bps < slow_link_mbit * 1e6:
        return SLOW_LINK_CODEC
    return LOSSLESS_CODEC


def on_this_host(addrs: Iterable[str]) -> bool:
    """Whether every one of a peer's multiaddrs is a loopback address (so it runs on this host; no slow link)."""
    hosts = []
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            return False
        try:
            hosts.append(ipaddress.ip_address(parts[2]))
        except ValueError:
            return False
    return bool(hosts) and all(h.is_loopback for h in hosts)


LocalShape = Callable[[str], Awaitable[ModelShape | None]]
"""The shape of this daemon's own copy of a model (None without one): what DHT records are checked against."""


def no_adapter_error(model: str, adapter: str) -> PetalError:
    """No usable server of ``model`` hosts the server-side ``adapter`` a request names."""
    return PetalError(
        "not_found",
        f"no server of {model} hosts adapter {adapter!r}; check its name in `petalctl swarm -m {model}`, "
        f"or start one with petald --serve {model} --adapter {adapter}=DIR",
    )


class Router:
    """Route choice for one daemon: swarm views per model, latency probes (EWMA), bans.

    ``transport`` is the node's libp2p transport (for ``info`` probes and remote spans), ``dht`` its DHT.
    ``local_shape``: the shape of the local copy of a model, if this daemon has one (see ``SwarmView``).
    Views are refreshed every ``period`` seconds in the background; one older than ``max_age`` is still used, while a
    refresh runs, up to ``max_stale`` (default ``period``): a call waits for the DHT only when its view is older than
    both (tests that must see every change at once pass ``max_age=0, max_stale=0``).
    """

    def __init__(
        self,
        transport: Transport,
        dht: SwarmDHT,
        *,
        period: float = 30.0,
        max_age: float = 10.0,
        max_stale: float | None = None,
        probe_timeout: float = 3.0,
        codec: str = AUTO_CODEC,
        slow_link_mbit: float = SLOW_LINK_MBIT,
        bans: BanList | None = None,
        rng: random.Random | None = None,
        local_shape: LocalShape | None = None,
        max_views: int = MAX_VIEWS,
        spot_check_rate: float = 0.0,
        local_forward: LocalForward | None = None,
        pipeline_min_tokens: int = PIPELINE_MIN_TOKENS,
    ) -> None:
        self.transport = transport
        self.dht = dht
        self.period = period
        self.max_age = max_age
        self.max_stale = period if max_stale is None else max_stale
        self.probe_timeout = probe_timeout
        if codec not in CODEC_CHOICES:
            raise ValueError(f"codec {codec!r}: use one of {', '.join(CODEC_CHOICES)}")
        self.codec = codec
        self.slow_link_mbit = slow_link_mbit
        self._bandwidth: dict[str, deque[float]] = {}  # peer -> recent upload bandwidth samples (bits/s)
        self._measured_at: dict[str, float] = {}  # peer -> monotonic time of its last bandwidth sample
        self._measuring: dict[str, asyncio.Task[None]] = {}  # peer -> a background probe of an unmeasured link
        self.bans = bans or BanList()
        self.rng = rng or random.Random()
        self.latency: dict[str, float] = {}
        self.limits: dict[str, tuple[int, int]] = {}  # peer -> (max_length, max_batch) its last info announced
        self._probed_at: dict[str, float] = {}
        self.local_shape = local_shape
        self.max_views = max_views
        self._views: OrderedDict[str, SwarmView] = OrderedDict()
        # trust (spotcheck.py): re-run a fraction of hops elsewhere; servers others reported weigh less in routing
        self.spot = SpotChecker(self, spot_check_rate, local_forward)
        self.pipeline_min_tokens = pipeline_min_tokens  # calls.forward's default (chains.pipeline_parts)
        self.reported: dict[str, int] = {}  # peer -> distinct signers of unexpired mismatch reports about it
        self._reports_read: dict[str, float] = {}  # model -> monotonic time reports were last read
        self._reading: dict[str, asyncio.Task[None]] = {}

    async def view(self, model: str, *, fresh: bool = False) -> SwarmView:
        """The model's swarm view: as it is while younger than ``max_age``; older, as it is while a refresh runs in
        the background (up to ``max_stale``, by default the background refresh's period, so a call does not wait for
        the DHT); refreshed first when older than both, or at once with ``fresh`` (after a failure).

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
        if fresh or view.stale(max(self.max_age, self.max_stale)):
            await view.refresh()
        elif view.stale(self.max_age):
            view.refresh_soon()
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
                self._bandwidth.pop(old_peer, None)
                self._measured_at.pop(old_peer, None)

    def record_bandwidth(self, peer_id: str, bits_per_s: float) -> None:
        """One measured sample of the upload bandwidth to a server (what ``auto`` decides from)."""
        samples = self._bandwidth.setdefault(peer_id, deque(maxlen=BANDWIDTH_SAMPLES))
        samples.append(bits_per_s)
        self._measured_at[peer_id] = time.monotonic()

    def bandwidth(self, peer_id: str) -> float | None:
        """The best recent bandwidth sample to a server in bits/s, None if not measured."""
        samples = self._bandwidth.get(peer_id)
        return max(samples) if samples else None

    def codec_for(self, server: ServerInfo, requested: str | None = None) -> str:
        """The wire codec of a hop on ``server``: the request's, else this daemon's; ``auto`` resolved by the link."""
        codec = requested or self.codec
        if codec != AUTO_CODEC:
            return codec
        if on_this_host(server.addrs):
            return LOSSLESS_CODEC
        return auto_codec(self.bandwidth(server.peer_id), self.slow_link_mbit)

    async def measure_bandwidth(self, model: str, server: ServerInfo, round_trip: float) -> float | None:
        """Time an ``info`` request padded with ``BANDWIDTH_PROBE_BYTES``; its time beyond ``round_trip`` (an
        unpadded one's) gives the upload bandwidth, recorded and returned (None when the server did not answer)."""
        t0 = time.perf_counter()
        try:
            await self.transport.call(
                server.peer,
                INFO_PROTOCOL,
                {"model": model, "pad": bytes(BANDWIDTH_PROBE_BYTES)},
                timeout=self.probe_timeout + 10.0,
            )
        except Exception as e:  # noqa: BLE001 - only a measurement: the info probe decides about bans
            log.debug("bandwidth probe of %s failed: %s", server.peer_id, e)
            return None
        extra = max(time.perf_counter() - t0 - round_trip, 1e-4)
        bits_per_s = BANDWIDTH_PROBE_BYTES * 8 / extra
        self.record_bandwidth(server.peer_id, bits_per_s)
        log.debug("link to %s: about %.0f Mbit/s", server.peer_id, bits_per_s / 1e6)
        return bits_per_s

    def _wants_measure(self, server: ServerInfo) -> bool:
        """Whether a probe of ``server`` should measure its link too (auto, not on this host, not measured lately)."""
        last = self._measured_at.get(server.peer_id, -math.inf)
        return (
            self.codec == AUTO_CODEC and not on_this_host(server.addrs) and time.monotonic() - last >= BANDWIDTH_PERIOD
        )

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
        if self._wants_measure(server):
            first = self.bandwidth(server.peer_id) is None
            for _ in range(FIRST_BANDWIDTH_SAMPLES if first else 1):
                await self.measure_bandwidth(model, server, seconds)
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

    def span(self, view: SwarmView, hop: Hop, codec: str | None = None, adapter: str | None = None) -> RemoteSpan:
        """The client of ``hop`` (a sub-range of a server's span) of ``view``'s model, with the hop's wire codec
        (``codec`` if given, else the daemon's; ``auto`` resolved by the link, see ``codec_for``); ``adapter``: the
        server-hosted adapter its requests name.

        A hop on a link ``auto`` has not measured yet (forward/backward route without probes) starts lossless and
        gets probed in the background, so later calls use what the measure says.
        """
        server = hop.server
        if (
            (codec or self.codec) == AUTO_CODEC
            and self.bandwidth(server.peer_id) is None
            and not on_this_host(server.addrs)
            and server.peer_id not in self._measuring
        ):
            task = asyncio.get_running_loop().create_task(self._measure_later(view.model, server))
            self._measuring[server.peer_id] = task
        return RemoteSpan(
            self.transport,
            server.peer,
            view.model,
            view.fingerprint or "",
            hop.start,
            hop.end,
            self.codec_for(server, codec),
            adapter=adapter,
        )

    async def _measure_later(self, model: str, server: ServerInfo) -> None:
        try:
            if self._wants_measure(server):
                await self.probe(model, server)
            else:  # a request asked for auto on a daemon with a fixed codec: measure the link alone
                await self.measure_bandwidth(model, server, self.latency.get(server.peer_id, 0.0))
        finally:
            self._measuring.pop(server.peer_id, None)

    def candidates(
        self,
        view: SwarmView,
        allowed: Iterable[str] | None = None,
        blocked: Iterable[str] | None = None,
        adapter: str | None = None,
    ) -> list[ServerInfo]:
        """The servers a request may use; with `adapter`, only those hosting that server-side adapter."""
        usable = select_servers(view.servers.values(), self.bans, allowed, blocked)
        return usable if adapter is None else [s for s in usable if adapter in s.adapters]

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
        adapter: str | None = None,
    ) -> list[Hop]:
        """The minimum-latency chain for [start, end) (the whole model by default), probing servers first; with
        `adapter`, through servers hosting that adapter only."""

        async def pick(usable: list[ServerInfo], a: int, b: int) -> list[Hop] | None:
            usable = [s for s in usable if s.start < b and s.end > a]
            await self.probe_all(model, usable)
            self._read_reports_later(model, usable)
            usable = [s for s in usable if not self.is_banned(s.peer_id)]
            link = self.route_link if any(s.next_pings for s in usable) else None
            return min_latency_chain(usable, a, b, self.route_latency, link=link)

        return await self._route(model, start, end, allowed, blocked, pick, adapter)

    async def throughput_chain(
        self,
        model: str,
        start: int = 0,
        end: int | None = None,
        *,
        allowed: Iterable[str] | None = None,
        blocked: Iterable[str] | None = None,
        adapter: str | None = None,
    ) -> list[Hop]:
        """A throughput-weighted random chain for [start, end) (forward/backward); with `adapter`, through servers
        hosting that adapter only."""

        async def pick(usable: list[ServerInfo], a: int, b: int) -> list[Hop] | None:
            return throughput_chain(usable, a, b, self.rng)

        return await self._route(model, start, end, allowed, blocked, pick, adapter)

    async def _route(
        self,
        model: str,
        start: int,
        end: int | None,
        allowed: Iterable[str] | None,
        blocked: Iterable[str] | None,
        pick: Callable[[list[ServerInfo], int, int], Awaitable[list[Hop] | None]],
        adapter: str | None = None,
    ) -> list[Hop]:
        """Ask `pick` for a chain over the usable servers; once more after a fresh DHT read (servers may have
        joined since the last refresh); else a clear error naming what the swarm has."""
        view = await self.view(model)
        start, end = self._check_range(view, start, end)
        for attempt in range(2):
            usable = self.candidates(view, allowed, blocked, adapter)
            chain = await pick(usable, start, end)
            if chain is not None:
                return chain
            if attempt == 0:
                view = await self.view(model, fresh=True)
        if adapter is not None and not usable:
            raise no_adapter_error(model, adapter)
        raise no_route_error(model, start, end, usable, list(view.servers.values()))

    def route_latency(self, server: ServerInfo) -> float:
        """The latency a route choice counts for ``server``: measured (or ``DEFAULT_LATENCY``), plus
        ``REPORT_PENALTY`` seconds per distinct signer (up to ``MAX_REPORT_PENALTIES``) of mismatch reports about it."""
        reports = min(self.reported.get(server.peer_id, 0), MAX_REPORT_PENALTIES)
        return self.latency.get(server.peer_id, DEFAULT_LATENCY) + REPORT_PENALTY * reports

    def route_link(self, server: ServerInfo, nxt: ServerInfo) -> float | None:
        """The round trip a route choice counts from ``server`` to ``nxt`` when one pushes to the other: what
        ``server`` announced it measured (its ``next_pings``), plus ``nxt``'s report penalty; None if not announced.
        """
        rtt = server.ping_to(nxt.peer_id)
        if rtt is None:
            return None
        return rtt + REPORT_PENALTY * min(self.reported.get(nxt.peer_id, 0), MAX_REPORT_PENALTIES)

    def _read_reports_later(self, model: str, servers: list[ServerInfo]) -> None:
        """Re-read the mismatch reports about ``servers`` in the background, at most every ``period`` per model."""
        now = time.monotonic()
        if model in self._reading or now - self._reports_read.get(model, -math.inf) < self.period:
            return
        self._reports_read[model] = now
        peers = [s.peer_id for s in servers]

        async def read() -> None:
            try:
                found = await read_reports(self.dht, model, peers)
                for peer in peers:
                    signers = len({r.signer for r in found.get(peer, [])})
                    if signers:
                        self.reported[peer] = signers
                    else:
                        self.reported.pop(peer, None)
                if len(self.reported) > MAX_PEERS:
                    self.reported.clear()
            except Exception as e:  # noqa: BLE001 - only a routing weight: the next read retries
                log.debug("reading mismatch reports about %s's servers failed: %s", model, e)
            finally:
                self._reading.pop(model, None)

        self._reading[model] = asyncio.get_running_loop().create_task(read())
        if len(self._reports_read) > self.max_views * 4:
            self._reports_read.pop(next(iter(self._reports_read)))

    async def close(self) -> None:
        for task in [*self._measuring.values(), *self._reading.values()]:
            task.cancel()
        self._measuring.clear()
        self._reading.clear()
        await self.spot.close()
        for view in self._views.values():
            await view.stop()
        self._views.clear()
