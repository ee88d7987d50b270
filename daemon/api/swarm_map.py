"""The swarm as a map, read straight from the DHT without the router (so without torch): which models are announced,
every server seen under a model's block keys (offline and draining ones too, which routing views drop), and the
state of each block. ``/metrics`` reads it on every scrape; the dashboard's ``/v1/dashboard`` adds the router's
round trips and route to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.routing.swarm import announced_models
from petal.protocol.records import MODELS_KEY, ServerRecord, block_key

STATES: Final = ("online", "joining", "draining", "unreachable", "offline")
"""What a server (or a block: the best of its servers') is, best first. "unreachable": announced online or joining,
but this daemon's probe of it failed; "offline": withdrawn, or a block no live server covers."""
MAX_MAP_BLOCKS: Final = 256
"""Block keys one map reads at most, whatever a model record claims (more blocks than any model we know of)."""
RELAY_MARK: Final = "/p2p-circuit"


@dataclass(frozen=True)
class SwarmModel:
    """One model as the servers announce it under ``MODELS_KEY`` (the majority's claim)."""

    name: str
    fingerprint: str
    num_blocks: int
    family: str
    servers: int  # model records announcing it


@dataclass(frozen=True)
class MapServer:
    """One server of one model, from its freshest entry under the model's block keys."""

    record: ServerRecord
    issued_at: float

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    @property
    def relayed(self) -> bool:
        """Reached only through a circuit relay (it announced no address of its own)."""
        return relay_only(self.record.addrs + self.record.direct)

    def state(self, unreachable: Callable[[str], bool] = lambda _: False) -> str:
        state = self.record.state
        if state in ("online", "joining") and unreachable(self.peer_id):
            return "unreachable"
        return state

    def to_json(self, unreachable: Callable[[str], bool] = lambda _: False) -> dict[str, Any]:
        r = self.record
        return {
            "peer_id": r.peer_id,
            "short_id": short_id(r.peer_id),
            "public_name": r.public_name,
            "state": self.state(unreachable),
            "start": r.start,
            "end": r.end,
            "throughput": r.throughput,
            "cache_tokens_left": r.cache_tokens_left,
            "dtype": r.dtype,
            "quant": r.quant or "none",
            "version": r.version,
            "reach": "relayed" if self.relayed else "direct",
            "tls": bool(r.direct),
            "fingerprint": r.fingerprint,
            "adapters": list(r.adapters),
            "announced_at": self.issued_at,
        }


def relay_only(addrs: Sequence[str]) -> bool:
    """Whether a server's announced addresses are all circuits: it can be reached only through a relay."""
    return bool(addrs) and all(RELAY_MARK in a for a in addrs)


def reach(relayed: bool, link: Mapping[str, str] | None) -> str:
    """How this daemon reaches a server: its live libp2p connection's reach when it has one (`link`, the daemon's
    `peer_links()` entry: "direct", "relayed", or "upgraded": first relayed, then made direct by DCUtR), else what the
    server's announced addresses allow ("relayed" when `relayed`: only circuits; else "direct")."""
    if link is not None and link.get("reach") in ("direct", "relayed", "upgraded"):
        return link["reach"]
    return "relayed" if relayed else "direct"


def short_id(peer_id: str) -> str:
    """The tail of a peer id: libp2p ids share their first characters (``12D3KooW``), not their last."""
    return peer_id[-8:]


async def swarm_models(dht: SwarmDHT) -> list[SwarmModel]:
    """Every model announced under ``MODELS_KEY``, with the fingerprint and shape most of its servers claim."""
    claims: dict[str, Counter[tuple[str, int, str]]] = {}
    for record in announced_models(e.value for e in await dht.get(MODELS_KEY)):
        claims.setdefault(record.name, Counter())[(record.fingerprint, record.num_blocks, record.family)] += 1
    out = []
    for name, votes in sorted(claims.items()):
        (fingerprint, num_blocks, family), _ = max(votes.items(), key=lambda kv: (kv[1], kv[0]))
        out.append(SwarmModel(name, fingerprint, num_blocks, family, sum(votes.values())))
    return out


async def scan_servers(dht: SwarmDHT, model: str, num_blocks: int, fingerprint: str | None = None) -> list[MapServer]:
    """Every server announced under the model's block keys (any state), one per peer and span: its freshest entry;
    a peer's older spans overlapping a fresher one (it moved) are dropped, disjoint ones (it serves several) kept.

    Entries of another fingerprint and spans past ``num_blocks`` are dropped, as routing does; malformed ones too.
    """
    n = max(0, min(num_blocks, MAX_MAP_BLOCKS))
    got = await dht.get_many([block_key(model, i) for i in range(n)])
    best: dict[tuple[str, int, int], MapServer] = {}
    for entries in got.values():
        for e in entries:
            record = ServerRecord.parse(e.value, e.peer_id)
            if record is None or record.end > n:
                continue
            if fingerprint is not None and record.fingerprint is not None and record.fingerprint != fingerprint:
                continue
            key = (e.peer_id, record.start, record.end)
            seen = best.get(key)
            if seen is None or e.issued_at > seen.issued_at:
                best[key] = MapServer(record, e.issued_at)
    kept: list[MapServer] = []
    for server in sorted(best.values(), key=lambda s: -s.issued_at):
        r = server.record
        mine = [k.record for k in kept if k.peer_id == server.peer_id]
        if all(r.end <= k.start or k.end <= r.start for k in mine):
            kept.append(server)
    return sorted(kept, key=lambda s: (s.record.start, s.record.end, s.peer_id))


def block_states(
    servers: Iterable[MapServer], num_blocks: int, unreachable: Callable[[str], bool] = lambda _: False
) -> list[str]:
    """Each block's state: the best state (``STATES`` order) of the servers covering it, "offline" if none does."""
    rank = {s: i for i, s in enumerate(STATES)}
    out = ["offline"] * max(0, min(num_blocks, MAX_MAP_BLOCKS))
    for server in servers:
        state = server.state(unreachable)
        for i in range(server.record.start, min(server.record.end, len(out))):
            if rank[state] < rank[out[i]]:
                out[i] = state
    return out


def uncovered_ranges(states: list[str]) -> list[list[int]]:
    """``[start, end)`` runs of blocks no online or joining server covers: the model is healthy when there are none."""
    runs: list[list[int]] = []
    for i, state in enumerate(states):
        if state in ("online", "joining"):
            continue
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs
