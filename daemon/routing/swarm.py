"""The swarm as a client sees it: ``ServerInfo`` per server and ``SwarmView``, which reads one model's servers from
the DHT (with the same record types the servers write them with) and refreshes them in the background."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import PeerAddr
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY, OFFLINE, ModelRecord, ServerRecord, block_key, parse_models

log = logging.getLogger("petal.router")

DEFAULT_BLOCK_TIME = 0.01
"""Seconds per block per step assumed for a server that announced no throughput."""
ROUTABLE_STATES = ("online", "joining")


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
    direct: tuple[str, ...] = ()  # direct data plane addresses (petal.daemon.net.direct); dialed before addrs
    public_name: str = ""  # what its operator calls it (petald --public-name), for people only
    dtype: str = ""
    version: int = 0  # the protocol version it announced
    next_pings: tuple[tuple[str, float], ...] = ()  # round trips (ms) it measured to next-span servers, by id suffix
    adapters: tuple[str, ...] = ()  # server-hosted LoRA adapters a request may name (petald --adapter)

    @classmethod
    def from_record(cls, record: ServerRecord) -> ServerInfo:
        return cls(
            peer_id=record.peer_id,
            start=record.start,
            end=record.end,
            throughput=record.throughput,
            addrs=record.addrs,
            state=record.state,
            fingerprint=record.fingerprint,
            cache_tokens_left=record.cache_tokens_left,
            quant=record.quant,
            direct=record.direct,
            public_name=record.public_name,
            dtype=record.dtype,
            version=record.version,
            next_pings=record.next_pings,
            adapters=record.adapters,
        )

    @property
    def peer(self) -> PeerAddr:
        return PeerAddr(self.peer_id, self.direct + self.addrs)

    def ping_to(self, peer_id: str) -> float | None:
        """Seconds of the round trip this server announced to ``peer_id`` (a next-span server), None if not."""
        for suffix, ms in self.next_pings:
            if peer_id.endswith(suffix):
                return ms / 1000
        return None

    def covers(self, a: int, b: int) -> bool:
        """Whether this server can run blocks [a, b) (any sub-range of its span)."""
        return self.start <= a < b <= self.end

    def block_time(self) -> float:
        """Seconds one block of this span takes per step, from the announced whole-span throughput."""
        if self.throughput > 0:
            return 1.0 / (self.throughput * (self.end - self.start))
        return DEFAULT_BLOCK_TIME


def group_servers(
    entries: Iterable[tuple[str, object]], fingerprint: str | None = None, num_blocks: int | None = None
) -> dict[str, ServerInfo]:
    """Merge ``(peer_id, value)`` pairs read under a model's block keys into one ServerInfo per server.

    Values are read as ``ServerRecord``s; malformed ones are skipped. A server announces the same value under every
    block of its span, so one entry per peer suffices; if its entries disagree (it is moving), the span seen most
    often wins over spans overlapping it, while disjoint spans are kept as several servers (a daemon may host several
    spans of one model: the first is keyed by its peer id, the others by ``peer_id#start``). Dropped: entries of
    another fingerprint (a different model under the same name) or of none (weights unnamed) when ``fingerprint`` is
    given, so a chain never mixes weights; offline ones; spans that end past the model's ``num_blocks`` (they disagree
    with the model's shape).
    """
    seen: dict[str, dict[ServerInfo, int]] = {}
    for peer_id, value in entries:
        record = ServerRecord.parse(value, peer_id)
        if record is None or record.state not in ROUTABLE_STATES:
            continue
        if fingerprint is not None and record.fingerprint != fingerprint:
            continue  # other weights, or weights it does not name: never in a chain with this fingerprint's
        if num_blocks is not None and record.end > num_blocks:
            continue
        info = ServerInfo.from_record(record)
        votes = seen.setdefault(peer_id, {})
        votes[info] = votes.get(info, 0) + 1
    grouped: dict[str, ServerInfo] = {}
    for peer, votes in seen.items():
        kept: list[ServerInfo] = []
        for info in sorted(votes, key=lambda i: (-votes[i], i.start)):
            if all(info.end <= k.start or k.end <= info.start for k in kept):
                kept.append(info)
        for n, info in enumerate(kept):
            grouped[peer if n == 0 else f"{peer}#{info.start}"] = info
    return grouped


def describe_swarm(servers: Iterable[ServerInfo]) -> str:
    """A short human summary of who serves what, for error messages."""
    spans = sorted((s.start, s.end, s.peer_id) for s in servers)
    if not spans:
        return "no servers at all"
    shown = ", ".join(f"[{a}, {b}) on {p[-6:]}" for a, b, p in spans[:12])
    more = f" and {len(spans) - 12} more" if len(spans) > 12 else ""
    return f"{len(spans)} server(s): {shown}{more}"


def announced_models(values: Iterable[object]) -> list[ModelRecord]:
    """The usable (well-formed, not offline) model records among MODELS_KEY values."""
    return [r for v in values for r in parse_models(v) if r.state != OFFLINE]


@dataclass(frozen=True)
class ModelShape:
    """What a local copy of a model says about it: the truth a client checks DHT records against."""

    fingerprint: str
    num_blocks: int


MAX_SHAPE_CANDIDATES = 8
"""How many distinct (fingerprint, block count) claims under MODELS_KEY a refresh checks against block records."""
MAX_UNCONFIRMED_BLOCKS = 256
"""Block keys a refresh reads for a shape no server record confirms (more blocks than any model we know of)."""


class SwarmView:
    """What the DHT says about one model: its fingerprint, block count and servers, refreshed in the background.

    ``fingerprint``: pin the model version; by default the one most servers announce under MODELS_KEY is used.
    ``local``: the shape of this daemon's own copy of the model (its config and fingerprint); records that disagree
    with it are ignored. Without one, the shape comes from the claim most signers agree on that a server's block
    record confirms (a server whose span ends at the last block), so that one forged record cannot change the block
    count, and a refresh reads a bounded number of keys whatever the records claim.
    """

    def __init__(
        self,
        dht: SwarmDHT,
        model: str,
        fingerprint: str | None = None,
        period: float = 30.0,
        local: ModelShape | None = None,
    ) -> None:
        self.dht = dht
        self.model = model
        self.pinned_fingerprint = fingerprint
        self.local = local
        self.fingerprint: str | None = fingerprint
        self.num_blocks: int | None = None
        self.family: str = ""
        self.servers: dict[str, ServerInfo] = {}
        self.period = period
        self.updated_at: float | None = None  # monotonic time of the last successful refresh
        self._task: asyncio.Task[None] | None = None
        self._soon: asyncio.Task[None] | None = None  # a refresh started by `refresh_soon`, while it runs
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Re-read the models key and every block key of the model (concurrently)."""
        async with self._lock:
            entries = await self.dht.get(MODELS_KEY)
            if not entries and self.updated_at is not None:
                # Right after a server dies, a lookup can come back empty because it timed out on the dead contact;
                # the next one skips it. Read once more before telling a failover that the model is gone.
                entries = await self.dht.get(MODELS_KEY)
            signers: dict[tuple[str, int], set[str]] = {}
            families: dict[tuple[str, int], str] = {}
            names: set[str] = set()
            for e, m in ((entry, m) for entry in entries for m in parse_models(entry.value)):
                if m.state == OFFLINE:
                    continue
                names.add(m.name)
                if m.name != self.model:
                    continue
                if self.pinned_fingerprint is not None and m.fingerprint != self.pinned_fingerprint:
                    continue
                shape = (m.fingerprint, m.num_blocks)
                signers.setdefault(shape, set()).add(e.peer_id)
                families.setdefault(shape, m.family)
            if not signers:
                raise PetalError(
                    "not_found",
                    f"no server announces model {self.model!r}"
                    + (f" with fingerprint {self.pinned_fingerprint}" if self.pinned_fingerprint else "")
                    + f"; the swarm serves: {', '.join(sorted(names)) or 'nothing yet'}. Check the name or start a "
                    "server for it.",
                )
            fp, n, last, trusted = await self._choose_shape(signers)
            self.fingerprint = fp
            self.num_blocks = n
            self.family = families[(fp, n)]
            keys = [b for b in range(n if trusted else min(n, MAX_UNCONFIRMED_BLOCKS)) if last is None or b != n - 1]
            per_block = await asyncio.gather(*(self.dht.get(block_key(self.model, b)) for b in keys))
            pairs = [(e.peer_id, e.value) for block_entries in per_block for e in block_entries] + (last or [])
            self.servers = group_servers(pairs, fp, n)
            self.updated_at = time.monotonic()
            log.debug("swarm view of %s: %s", self.model, describe_swarm(self.servers.values()))

    async def _choose_shape(
        self, signers: dict[tuple[str, int], set[str]]
    ) -> tuple[str, int, list[tuple[str, object]] | None, bool]:
        """The (fingerprint, num_blocks) to use, the entries read under its last block key (None if not read), and
        whether the shape is trusted (all its block keys are then read; at most MAX_UNCONFIRMED_BLOCKS otherwise).

        The local copy's shape wins whenever some record agrees with it, and a lone claim of a bounded block count is
        taken as it is (its keys are read in one round). Otherwise claims are tried by how many
        distinct signers make them (then the smaller block count): the first that a routable server record under its
        last block confirms (same fingerprint, span ending there) is used; if none is, the best-supported claim.
        """
        if self.local is not None and (self.local.fingerprint, self.local.num_blocks) in signers:
            return self.local.fingerprint, self.local.num_blocks, None, True
        if len(signers) == 1:  # the usual case: nothing to choose from; reading all its keys is bounded
            [(fp, n)] = signers
            if n <= MAX_UNCONFIRMED_BLOCKS:
                return fp, n, None, True
        ranked = sorted(signers, key=lambda s: (-len(signers[s]), s[1], s[0]))[:MAX_SHAPE_CANDIDATES]
        lasts = await asyncio.gather(*(self.dht.get(block_key(self.model, n - 1)) for _, n in ranked))
        for (fp, n), last in zip(ranked, lasts, strict=True):
            pairs: list[tuple[str, object]] = [(e.peer_id, e.value) for e in last]
            if any(s.end == n for s in group_servers(pairs, fp, n).values()):
                return fp, n, pairs, True
        if len(signers) > 1:
            log.info(
                "no server confirms any of %d block counts announced for %s; using the most announced one",
                len(signers),
                self.model,
            )
        fp, n = ranked[0]
        return fp, n, None, False

    def stale(self, max_age: float) -> bool:
        return self.updated_at is None or time.monotonic() - self.updated_at > max_age

    def refresh_soon(self) -> None:
        """Start a refresh in the background unless one started this way still runs (a failure keeps the view)."""
        if self._soon is None or self._soon.done():
            self._soon = asyncio.create_task(self._refresh_quietly(), name=f"swarm-view-refresh-{self.model}")

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as e:  # noqa: BLE001 - a failed refresh keeps the old view; the next one retries
            log.info("refreshing the swarm view of %s failed: %s", self.model, e)

    def start(self) -> None:
        """Refresh every ``period`` seconds in the background until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"swarm-view-{self.model}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            await self._refresh_quietly()

    async def stop(self) -> None:
        for task in (self._task, self._soon):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._soon = None
