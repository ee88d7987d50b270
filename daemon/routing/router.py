"""Which servers a request goes through: the swarm view from the DHT, latency probes, route choice and bans.

The route choice is pure (``min_latency_chain``, ``throughput_chain``, ``split_batch``) so it is tested without a
network; ``SwarmView`` and ``Router`` wrap it with DHT reads, ``info`` probes and per-peer bans.

Inference wants the *fastest* chain (each step crosses every hop, so latency dominates); forward/backward want the
*highest throughput* and spread load across servers, so they choose at random weighted by throughput (Petals §3.2).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY, STATE_FIELD, block_key

if TYPE_CHECKING:
    from petal.daemon.net.transport import PeerAddr

log = logging.getLogger("petal.router")

INFO_PROTOCOL = "/petal/block/info/1"
DEFAULT_LATENCY = 0.1
"""Seconds assumed for a server never probed: pessimistic enough that a measured server usually wins."""
LATENCY_EWMA = 0.3
"""Weight of a new latency sample; the rest is history, so one slow reply does not reroute everything."""
DEFAULT_BLOCK_TIME = 0.01
"""Seconds per block per step assumed for a server that announced no throughput."""


# --- the swarm as the router sees it --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerInfo:
    """One server's span of one model, merged from its entries under the block keys."""

    peer_id: str
    start: int
    end: int
    throughput: float = 0.0  # tokens/s of a forward through the whole span, as the server measured it
    addrs: tuple[str, ...] = ()
    state: str = "online"
    fingerprint: str | None = None
    cache_tokens_left: int = 0
    quant: str = ""

    @property
    def peer(self) -> PeerAddr:
        from petal.daemon.net.transport import PeerAddr  # lazily: the route choice itself needs no transport

        return PeerAddr(self.peer_id, self.addrs)

    def covers(self, a: int, b: int) -> bool:
        """Whether this server can run blocks [a, b) (any sub-range of its span)."""
        return self.start <= a < b <= self.end

    def block_time(self) -> float:
        """Seconds one block of this span takes per step, from the announced whole-span throughput."""
        if self.throughput > 0:
            return 1.0 / (self.throughput * (self.end - self.start))
        return DEFAULT_BLOCK_TIME


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on ``server`` (a sub-range of its span)."""

    server: ServerInfo
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


def _num(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def parse_server_value(peer_id: str, value: Mapping[str, Any]) -> ServerInfo | None:
    """A block-key entry's value as a ServerInfo, or None if it is unusable.

    Accepts both the long field names of the serving protocol (``span``, ``state``, ``throughput``, ``cache``,
    ``fp``, ``addrs``, ``quant``) and the short ones of ``records.ServerRecord`` (``s``, ``st``, ``t``, ``c``,
    ``a``, plus ``q`` and ``fp``), so the router keeps working whichever the server writes.
    """
    if not isinstance(value, Mapping):
        return None
    span = value.get("span", value.get("s"))
    if not (isinstance(span, (list, tuple)) and len(span) == 2):
        return None
    start, end = span
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)) or not 0 <= start < end:
        return None
    state = value.get("state", value.get(STATE_FIELD, "online"))
    addrs = value.get("addrs", value.get("a", []))
    if not isinstance(addrs, (list, tuple)):
        addrs = []
    fp = value.get("fp", value.get("fingerprint"))
    quant = value.get("quant", value.get("q", ""))
    return ServerInfo(
        peer_id=peer_id,
        start=start,
        end=end,
        throughput=_num(value.get("throughput", value.get("t"))),
        addrs=tuple(a for a in addrs if isinstance(a, str)),
        state=state if isinstance(state, str) else "online",
        fingerprint=fp if isinstance(fp, str) else None,
        cache_tokens_left=int(_num(value.get("cache", value.get("c")))),
        quant=quant if isinstance(quant, str) else "",
    )


def group_servers(
    entries: Iterable[tuple[str, Mapping[str, Any]]], fingerprint: str | None = None
) -> dict[str, ServerInfo]:
    """Merge ``(peer_id, value)`` pairs read under a model's block keys into one ServerInfo per server.

    A server announces the same value under every block of its span, so one entry per peer suffices; if its
    entries disagree (it is moving), the span seen most often wins. Entries of another fingerprint (a different
    model under the same name) and offline ones are dropped.
    """
    seen: dict[str, dict[ServerInfo, int]] = {}
    for peer_id, value in entries:
        info = parse_server_value(peer_id, value)
        if info is None or info.state not in ("online", "joining"):
            continue
        if fingerprint is not None and info.fingerprint is not None and info.fingerprint != fingerprint:
            continue
        votes = seen.setdefault(peer_id, {})
        votes[info] = votes.get(info, 0) + 1
    return {peer: max(votes, key=lambda i: votes[i]) for peer, votes in seen.items()}


def parse_model_value(value: Mapping[str, Any]) -> tuple[str, str, int, str] | None:
    """``(name, fingerprint, num_blocks, family)`` from a MODELS_KEY entry (long or short field names)."""
    if not isinstance(value, Mapping):
        return None
    name = value.get("name", value.get("n"))
    fp = value.get("fp", value.get("f"))
    n = value.get("num_blocks", value.get("b"))
    family = value.get("family", value.get("fm", ""))
    if value.get(STATE_FIELD, value.get("state")) == "offline":
        return None
    if not (isinstance(name, str) and isinstance(fp, str) and isinstance(n, int) and not isinstance(n, bool) and n > 0):
        return None
    return name, fp, n, family if isinstance(family, str) else ""


# --- route choice (pure) --------------------------------------------------------------------------------------------


def describe_swarm(servers: Iterable[ServerInfo]) -> str:
    """A short human summary of who serves what, for error messages."""
    spans = sorted((s.start, s.end, s.peer_id) for s in servers)
    if not spans:
        return "no servers at all"
    shown = ", ".join(f"[{a}, {b}) on {p[-6:]}" for a, b, p in spans[:12])
    more = f" and {len(spans) - 12} more" if len(spans) > 12 else ""
    return f"{len(spans)} server(s): {shown}{more}"


def uncovered(servers: Iterable[ServerInfo], start: int, end: int) -> list[tuple[int, int]]:
    """The maximal ranges inside [start, end) that no server covers."""
    covered = [False] * (end - start)
    for s in servers:
        for b in range(max(s.start, start), min(s.end, end)):
            covered[b - start] = True
    gaps: list[tuple[int, int]] = []
    for i, ok in enumerate(covered):
        if not ok:
            if gaps and gaps[-1][1] == start + i:
                gaps[-1] = (gaps[-1][0], start + i + 1)
            else:
                gaps.append((start + i, start + i + 1))
    return gaps


def no_route_error(
    model: str, start: int, end: int, usable: Sequence[ServerInfo], known: Sequence[ServerInfo] | None = None
) -> PetalError:
    """The "unavailable" error naming the blocks no usable server covers, and what the swarm has instead.

    ``usable``: the servers the request may use; ``known``: every server the view knows (banned or excluded too).
    """
    known = usable if known is None else known
    gaps = uncovered(usable, start, end)
    missing = ", ".join(f"{a}..{b}" for a, b in gaps) or f"{start}..{end}"
    excluded = len({s.peer_id for s in known} - {s.peer_id for s in usable})
    why = f" ({excluded} of them banned after failures or excluded by the request's server lists)" if excluded else ""
    return PetalError(
        "unavailable",
        f"no servers cover blocks {missing} of {model}; the swarm has {describe_swarm(known)}{why}. "
        f"Start a server for those blocks (petald --serve {model} --blocks A:B) or wait for one to join.",
    )


def min_latency_chain(
    servers: Iterable[ServerInfo],
    start: int,
    end: int,
    latency: Mapping[str, float] | Callable[[ServerInfo], float],
    compute_time: Callable[[ServerInfo], float] = ServerInfo.block_time,
) -> list[Hop] | None:
    """The chain covering [start, end) with the least total (latency + blocks x compute time), by Dijkstra.

    Nodes are block boundaries; for every server and every [a, b) inside its span there is an edge a -> b of cost
    ``latency(server) + (b - a) * compute_time(server)``. Ties go to fewer hops. Returns None if no chain exists.
    """
    if not start < end:
        raise ValueError(f"empty block range [{start}, {end})")
    lat = latency if callable(latency) else (lambda s: latency.get(s.peer_id, DEFAULT_LATENCY))  # type: ignore[union-attr]
    usable = [s for s in servers if s.start < end and s.end > start]
    costs = {s.peer_id: (max(0.0, lat(s)), max(0.0, compute_time(s))) for s in usable}
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}
    back: dict[int, tuple[int, ServerInfo]] = {}
    heap: list[tuple[float, int, int]] = [(0.0, 0, start)]
    while heap:
        cost, hops, a = heapq.heappop(heap)
        if (cost, hops) > best.get(a, (math.inf, 0)):
            continue
        if a == end:
            break
        for s in usable:
            if not s.start <= a < s.end:
                continue
            fixed, per_block = costs[s.peer_id]
            for b in range(a + 1, min(s.end, end) + 1):
                key = (cost + fixed + (b - a) * per_block, hops + 1)
                if key < best.get(b, (math.inf, 0)):
                    best[b] = key
                    back[b] = (a, s)
                    heapq.heappush(heap, (key[0], key[1], b))
    if end not in back:
        return None
    chain: list[Hop] = []
    b = end
    while b != start:
        a, s = back[b]
        chain.append(Hop(s, a, b))
        b = a
    return chain[::-1]


def throughput_chain(
    servers: Iterable[ServerInfo], start: int, end: int, rng: random.Random | None = None
) -> list[Hop] | None:
    """A chain for forward/backward: at each boundary, a server covering the next block, picked at random with
    probability proportional to its throughput, used as far as its span reaches (fewer hops, load spread).

    Returns None if some block has no server.
    """
    if not start < end:
        raise ValueError(f"empty block range [{start}, {end})")
    rng = rng or random.Random()
    usable = list(servers)
    chain: list[Hop] = []
    a = start
    while a < end:
        candidates = [s for s in usable if s.start <= a < s.end]
        if not candidates:
            return None
        weights = [max(s.throughput, 1e-6) for s in candidates]
        s = rng.choices(candidates, weights)[0]
        b = min(s.end, end)
        chain.append(Hop(s, a, b))
        a = b
    return chain


def split_batch(batch: int, servers: Sequence[ServerInfo], min_rows: int = 1) -> list[tuple[ServerInfo, int, int]]:
    """Split ``batch`` rows across servers of the same span in proportion to throughput: ``(server, lo, hi)``.

    Each part gets at least ``min_rows`` rows (so tiny batches are not scattered); servers that would get fewer
    are left out, the fastest first kept.
    """
    if batch <= 0 or not servers:
        raise ValueError("split_batch needs a positive batch and at least one server")
    ranked = sorted(servers, key=lambda s: (-s.throughput, s.peer_id))
    ranked = ranked[: max(1, min(len(ranked), batch // max(1, min_rows)))]
    total = sum(max(s.throughput, 1e-6) for s in ranked)
    shares = [batch * max(s.throughput, 1e-6) / total for s in ranked]
    counts = [max(min_rows, int(x)) for x in shares]
    while sum(counts) > batch:  # the floor of min_rows overshot: take back from the largest
        i = max(range(len(counts)), key=lambda j: counts[j])
        counts[i] -= 1
    order = sorted(range(len(ranked)), key=lambda j: shares[j] - int(shares[j]), reverse=True)
    k = 0
    while sum(counts) < batch:  # hand out the remainder by largest fractional share
        counts[order[k % len(order)]] += 1
        k += 1
    parts, lo = [], 0
    for s, c in zip(ranked, counts):
        if c > 0:
            parts.append((s, lo, lo + c))
            lo += c
    return parts


# --- bans -----------------------------------------------------------------------------------------------------------


@dataclass
class BanList:
    """Peers that failed recently; each consecutive failure doubles the ban (``base`` .. ``cap`` seconds)."""

    base: float = 2.0
    cap: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer_id: str) -> float:
        """Ban ``peer_id``; returns the ban's length in seconds."""
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        length = min(self.cap, self.base * 2 ** (strikes - 1))
        self._until[peer_id] = self.clock() + length
        return length

    def is_banned(self, peer_id: str) -> bool:
        until = self._until.get(peer_id)
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[peer_id]  # strikes stay, so a flapping server is banned longer next time
            return False
        return True

    def succeeded(self, peer_id: str) -> None:
        """A successful call clears the strikes: the next failure starts from ``base`` again."""
        self._strikes.pop(peer_id, None)
        self._until.pop(peer_id, None)


def select_servers(
    servers: Iterable[ServerInfo],
    bans: BanList | None = None,
    allowed: Iterable[str] | None = None,
    blocked: Iterable[str] | None = None,
) -> list[ServerInfo]:
    """The servers a request may use: not banned, in ``allowed`` if given, not in ``blocked``."""
    allow = set(allowed) if allowed is not None else None
    block = set(blocked or ())
    return [
        s
        for s in servers
        if (allow is None or s.peer_id in allow) and s.peer_id not in block and not (bans and bans.is_banned(s.peer_id))
    ]


# --- swarm view and router (I/O) ------------------------------------------------------------------------------------


class SwarmView:
    """What the DHT says about one model: its fingerprint, block count and servers, refreshed in the background.

    ``dht`` needs ``async get(key) -> [Entry]`` (``petal.daemon.dht.network.DHT``). ``fingerprint``: pin the model version;
    by default the one most servers announce under MODELS_KEY is used.
    """

    def __init__(self, dht: Any, model: str, fingerprint: str | None = None, period: float = 30.0) -> None:
        self.dht = dht
        self.model = model
        self.pinned_fingerprint = fingerprint
        self.fingerprint: str | None = fingerprint
        self.num_blocks: int | None = None
        self.family: str = ""
        self.servers: dict[str, ServerInfo] = {}
        self.period = period
        self.updated_at: float | None = None  # monotonic time of the last successful refresh
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Re-read the models key and every block key of the model (concurrently)."""
        async with self._lock:
            models = await self.dht.get(MODELS_KEY)
            if not models and self.updated_at is not None:
                # Right after a server dies, a lookup can come back empty because it timed out on the dead contact;
                # the next one skips it. Read once more before telling a failover that the model is gone.
                models = await self.dht.get(MODELS_KEY)
            found: dict[str, list[tuple[int, str]]] = {}
            for e in models:
                parsed = parse_model_value(e.value)
                if parsed and parsed[0] == self.model:
                    found.setdefault(parsed[1], []).append((parsed[2], parsed[3]))
            if self.pinned_fingerprint is not None:
                choices = found.get(self.pinned_fingerprint, [])
                fp = self.pinned_fingerprint
            elif found:
                fp, choices = max(found.items(), key=lambda kv: (len(kv[1]), kv[0]))
            else:
                fp, choices = None, []
            if not choices:
                known = ", ".join(sorted({parse_model_value(e.value)[0] for e in models if parse_model_value(e.value)}))
                raise PetalError(
                    "not_found",
                    f"no server announces model {self.model!r}"
                    + (f" with fingerprint {self.pinned_fingerprint}" if self.pinned_fingerprint else "")
                    + f"; the swarm serves: {known or 'nothing yet'}. Check the name or start a server for it.",
                )
            self.fingerprint = fp
            self.num_blocks = max(n for n, _ in choices)
            self.family = choices[0][1]
            per_block = await asyncio.gather(*(self.dht.get(block_key(self.model, b)) for b in range(self.num_blocks)))
            pairs = [(e.peer_id, e.value) for entries in per_block for e in entries]
            self.servers = group_servers(pairs, fp)
            self.updated_at = time.monotonic()
            log.debug("swarm view of %s: %s", self.model, describe_swarm(self.servers.values()))

    def stale(self, max_age: float) -> bool:
        return self.updated_at is None or time.monotonic() - self.updated_at > max_age

    def start(self) -> None:
        """Refresh every ``period`` seconds in the background until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"swarm-view-{self.model}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - a failed refresh keeps the old view; the next one retries
                log.info("refreshing the swarm view of %s failed: %s", self.model, e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class Router:
    """Route choice for one daemon: swarm views per model, latency probes (EWMA), bans.

    ``transport`` is the node's libp2p transport (for ``info`` probes and remote spans), ``dht`` its DHT.
    """

    def __init__(
        self,
        transport: Any,
        dht: Any,
        *,
        period: float = 30.0,
        max_age: float = 10.0,
        probe_timeout: float = 3.0,
        codec: str = "q8",
        bans: BanList | None = None,
        rng: random.Random | None = None,
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
        self._probed_at: dict[str, float] = {}
        self._views: dict[str, SwarmView] = {}

    @classmethod
    def for_node(cls, node: Any, **kwargs: Any) -> Router:
        return cls(node.transport, node.dht, **kwargs)

    async def view(self, model: str, *, fresh: bool = False) -> SwarmView:
        """The model's swarm view, refreshed if older than ``max_age`` (or at once with ``fresh``)."""
        view = self._views.get(model)
        if view is None:
            view = self._views[model] = SwarmView(self.dht, model, period=self.period)
            await view.refresh()
            view.start()
        elif fresh or view.stale(self.max_age):
            await view.refresh()
        return view

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

    async def probe(self, model: str, server: ServerInfo) -> float | None:
        """Time one ``info`` round trip; a server that does not answer is banned and gets None."""
        t0 = time.perf_counter()
        try:
            reply = await self.transport.call(server.peer, INFO_PROTOCOL, {"model": model}, timeout=self.probe_timeout)
        except Exception as e:  # noqa: BLE001 - any failure to answer means "do not route through it now"
            self.ban(server.peer_id, f"info probe failed: {e}")
            return None
        if isinstance(reply, dict) and "error" in reply:
            self.ban(server.peer_id, f"info probe answered {reply['error']}")
            return None
        seconds = time.perf_counter() - t0
        self.record_latency(server.peer_id, seconds)
        return seconds

    async def probe_all(self, model: str, servers: Iterable[ServerInfo], max_age: float | None = None) -> None:
        """Probe, concurrently, every server whose latency is unknown or older than ``max_age`` (default: period)."""
        limit = self.period if max_age is None else max_age
        now = time.monotonic()
        todo = [s for s in servers if now - self._probed_at.get(s.peer_id, -math.inf) > limit]
        if todo:
            await asyncio.gather(*(self.probe(model, s) for s in todo))

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
