"""Route choice, pure (no I/O, so it is tested without a network): the minimum-latency chain for inference, a
throughput-weighted chain, batch split and pipeline micro-batches for forward/backward, which servers a request may
use, and the error that names the blocks nobody covers.

Inference wants the *fastest* chain (each step crosses every hop, so latency dominates); forward/backward want the
*highest throughput* and spread load across servers, so they choose at random weighted by throughput (Petals §3.2).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from petal.daemon.routing.bans import BanList
from petal.daemon.routing.swarm import ServerInfo, describe_swarm
from petal.protocol.errors import PetalError

DEFAULT_LATENCY = 0.1
"""Seconds assumed for a server never probed: pessimistic enough that a measured server usually wins."""


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run on ``server`` (a sub-range of its span)."""

    server: ServerInfo
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


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
    link: Link | None = None,
) -> list[Hop] | None:
    """The chain covering [start, end) with the least total (latency + blocks x compute time), by Dijkstra.

    Nodes are block boundaries; for every server and every [a, b) inside its span there is an edge a -> b of cost
    ``latency(server) + (b - a) * compute_time(server)``. Ties go to fewer hops. Returns None if no chain exists.

    With ``link`` (server-to-server round trips, for sessions whose servers push to each other), a step costs
    ``latency(first) / 2 + sum of link(hop, next hop) + latency(last) / 2`` plus compute: the client sends to the
    first hop, each hop pushes to the next, the last answers the client. A pair ``link`` does not know costs
    ``(latency(a) + latency(b)) / 2``, so without any known link this is the same total as without ``link``.
    """
    if not start < end:
        raise ValueError(f"empty block range [{start}, {end})")
    if link is not None:
        return _pushed_chain(servers, start, end, latency, compute_time, link)
    if callable(latency):
        lat = latency
    else:
        table = latency

        def lat(s: ServerInfo) -> float:
            return table.get(s.peer_id, DEFAULT_LATENCY)

    usable = [s for s in servers if s.start < end and s.end > start]
    costs = {s: (max(0.0, lat(s)), max(0.0, compute_time(s))) for s in usable}  # per span: a peer may host several
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
            fixed, per_block = costs[s]
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


Link = Callable[[ServerInfo, ServerInfo], float | None]
"""Seconds of the round trip from one server to the next in a chain, None when not measured."""


def _pushed_chain(
    servers: Iterable[ServerInfo],
    start: int,
    end: int,
    latency: Mapping[str, float] | Callable[[ServerInfo], float],
    compute_time: Callable[[ServerInfo], float],
    link: Link,
) -> list[Hop] | None:
    """``min_latency_chain`` with server-to-server links: Dijkstra over (boundary, server that ends there).

    Hops switch only at boundaries where some span starts or ends (or at ``start``/``end``): every cost is linear in
    a switch point, so an optimal chain exists with switches at those points, and the graph stays small.
    """
    lat = latency if callable(latency) else (lambda s, t=latency: t.get(s.peer_id, DEFAULT_LATENCY))
    usable = [s for s in servers if s.start < end and s.end > start]
    half = {s.peer_id: max(0.0, lat(s)) / 2 for s in usable}
    per_block = {s.peer_id: max(0.0, compute_time(s)) for s in usable}
    points = sorted({start, end, *(b for s in usable for b in (s.start, s.end) if start < b < end)})
    by_id = {s.peer_id: s for s in usable}

    def hop_cost(prev: ServerInfo | None, s: ServerInfo) -> float:
        if prev is None:
            return half[s.peer_id]
        known = link(prev, s)
        return max(0.0, known) if known is not None else half[prev.peer_id] + half[s.peer_id]

    Node = tuple[int, str]  # (boundary, peer id of the hop that ends there; "" at start)
    best: dict[Node, tuple[float, int]] = {(start, ""): (0.0, 0)}
    back: dict[Node, Node] = {}
    heap: list[tuple[float, int, int, str]] = [(0.0, 0, start, "")]
    done: Node | None = None
    while heap:
        cost, hops, a, prev_id = heapq.heappop(heap)
        node = (a, prev_id)
        if (cost, hops) > best.get(node, (math.inf, 0)):
            continue
        if a == end:
            done = node
            break
        prev = by_id.get(prev_id)
        for s in usable:
            if not s.start <= a < s.end or s.peer_id == prev_id:
                continue
            enter = cost + hop_cost(prev, s)
            for b in points:
                if b <= a or b > s.end:
                    continue
                total = enter + (b - a) * per_block[s.peer_id] + (half[s.peer_id] if b == end else 0.0)
                key, nxt = (total, hops + 1), (b, s.peer_id)
                if key < best.get(nxt, (math.inf, 0)):
                    best[nxt] = key
                    back[nxt] = node
                    heapq.heappush(heap, (total, hops + 1, b, s.peer_id))
    if done is None:
        return None
    chain: list[Hop] = []
    node = done
    while node[0] != start:
        prev_node = back[node]
        chain.append(Hop(by_id[node[1]], prev_node[0], node[0]))
        node = prev_node
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
    for s, c in zip(ranked, counts, strict=True):
        if c > 0:
            parts.append((s, lo, lo + c))
            lo += c
    return parts


PIPELINE_MIN_TOKENS = 128
"""The fewest tokens of a pipeline's micro-batch by default (petald --pipeline-min-tokens)."""


def pipeline_parts(rows: int, tokens: int, hops: int, min_tokens: int = PIPELINE_MIN_TOKENS) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` of the micro-batches a forward of ``rows`` x ``tokens`` runs as through ``hops`` hops.

    Hop j of micro-batch i runs while hop j+1 runs micro-batch i-1, so the servers of a chain compute at the same
    time instead of in turn: k micro-batches through n hops take about (k + n - 1) / k hop-times instead of n. Up to
    2n micro-batches (more buys little and costs a message each), none under ``min_tokens`` tokens (small matmuls
    run slower per token); one hop, or too small a batch, gives one part: no pipeline.
    """
    if rows <= 0 or tokens <= 0:
        raise ValueError("pipeline_parts needs a positive batch")
    return _even_ranges(rows, _micro_batches(rows, rows * tokens, hops, min_tokens))


def prefill_parts(rows: int, tokens: int, hops: int, min_tokens: int = PIPELINE_MIN_TOKENS) -> list[tuple[int, int]]:
    """Token ranges ``[lo, hi)`` an inference step of ``rows`` x ``tokens`` (a prompt's prefill) runs as through
    ``hops`` hops: the same pipeline as `pipeline_parts`, cut along positions instead of rows, since a session's rows
    share one cache. Each server runs the chunks in order, so every chunk finds the positions before it cached."""
    if rows <= 0 or tokens <= 0:
        raise ValueError("prefill_parts needs a positive step")
    return _even_ranges(tokens, _micro_batches(tokens, rows * tokens, hops, min_tokens))


def _micro_batches(most: int, tokens: int, hops: int, min_tokens: int) -> int:
    """How many micro-batches: up to 2 per hop and ``most``, none under ``min_tokens``; one without a pipeline."""
    return 1 if hops < 2 else max(1, min(most, 2 * hops, tokens // max(1, min_tokens)))


def _even_ranges(n: int, k: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``k`` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(n, k)
    parts, lo = [], 0
    for i in range(k):
        hi = lo + base + (1 if i < extra else 0)
        parts.append((lo, hi))
        lo = hi
    return parts


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
