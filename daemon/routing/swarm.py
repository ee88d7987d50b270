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
from petal.protocol.records import MODELS_KEY, OFFLINE, ModelRecord, ServerRecord, block_key

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
        )

    @property
    def peer(self) -> PeerAddr:
        return PeerAddr(self.peer_id, self.addrs)

    def covers(self, a: int, b: int) -> bool:
        """Whether this server can run blocks [a, b) (any sub-range of its span)."""
        return self.start <= a < b <= self.end

    def block_time(self) -> float:
        """Seconds one block of this span takes per step, from the announced whole-span throughput."""
        if self.throughput > 0:
            return 1.0 / (self.throughput * (self.end - self.start))
        return DEFAULT_BLOCK_TIME


def group_servers(entries: Iterable[tuple[str, object]], fingerprint: str | None = None) -> dict[str, ServerInfo]:
    """Merge ``(peer_id, value)`` pairs read under a model's block keys into one ServerInfo per server.

    Values are read as ``ServerRecord``s; malformed ones are skipped. A server announces the same value under every
    block of its span, so one entry per peer suffices; if its entries disagree (it is moving), the span seen most
    often wins. Entries of another fingerprint (a different model under the same name) and offline ones are dropped.
    """
    seen: dict[str, dict[ServerInfo, int]] = {}
    for peer_id, value in entries:
        record = ServerRecord.parse(value, peer_id)
        if record is None or record.state not in ROUTABLE_STATES:
            continue
        if fingerprint is not None and record.fingerprint is not None and record.fingerprint != fingerprint:
            continue
        info = ServerInfo.from_record(record)
        votes = seen.setdefault(peer_id, {})
        votes[info] = votes.get(info, 0) + 1
    return {peer: max(votes, key=lambda i: votes[i]) for peer, votes in seen.items()}


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
    records = (ModelRecord.parse(v) for v in values)
    return [r for r in records if r is not None and r.state != OFFLINE]


class SwarmView:
    """What the DHT says about one model: its fingerprint, block count and servers, refreshed in the background.

    ``fingerprint``: pin the model version; by default the one most servers announce under MODELS_KEY is used.
    """

    def __init__(self, dht: SwarmDHT, model: str, fingerprint: str | None = None, period: float = 30.0) -> None:
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
            entries = await self.dht.get(MODELS_KEY)
            if not entries and self.updated_at is not None:
                # Right after a server dies, a lookup can come back empty because it timed out on the dead contact;
                # the next one skips it. Read once more before telling a failover that the model is gone.
                entries = await self.dht.get(MODELS_KEY)
            models = announced_models(e.value for e in entries)
            found: dict[str, list[tuple[int, str]]] = {}
            for m in models:
                if m.name == self.model:
                    found.setdefault(m.fingerprint, []).append((m.num_blocks, m.family))
            if self.pinned_fingerprint is not None:
                choices = found.get(self.pinned_fingerprint, [])
                fp: str | None = self.pinned_fingerprint
            elif found:
                fp, choices = max(found.items(), key=lambda kv: (len(kv[1]), kv[0]))
            else:
                fp, choices = None, []
            if not choices:
                known = ", ".join(sorted({m.name for m in models}))
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
            pairs = [(e.peer_id, e.value) for block_entries in per_block for e in block_entries]
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
