"""The in-memory DHT: ``MemoryDHT`` nodes sharing one ``MemorySwarm``, for tests of the layers above.

The twin of ``DHT`` as ``MemoryTransport`` is of ``Libp2pTransport``: same ``SwarmDHT`` contract, same
semantics, no UDP ports. Entries are really signed by each node's identity and merged by the same
``PetalStorage`` the UDP nodes use, so code tested against it sees what it would over the network: one
entry per signer per key (a newer one replaces the older), entries of several signers side by side,
freshest first, expiry by TTL, withdraw as a short-lived offline entry, and the same ``RecordError``\\ s.
The swarm is one store that every node reads and writes, as if every node were among the k closest.

Each node has an ``address`` (default 127.0.0.1): its entries are charged to that source, as the UDP DHT charges
a record to the address that sent it, and an entry is vouched for while its signer's node runs on the swarm
(the UDP DHT: while its node answers us). ``MemorySwarm.store`` is what a hostile store RPC from an address does,
so the storage policy against many identities on one address is tested against both DHTs alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.dht.signer import WITHDRAW_TTL, EntrySigner
from petal.daemon.dht.storage import PetalStorage, source_of
from petal.daemon.identity import Identity
from petal.protocol.records import Entry, RecordError, key_digest

__all__ = ["MemoryDHT", "MemorySwarm"]

log = logging.getLogger(__name__)


class MemorySwarm:
    """What all ``MemoryDHT`` nodes on it share: one store, and which nodes are running.

    ``clock`` (seconds since the epoch, like ``time.time``) lets a test move time forward to expire entries
    without sleeping; every node on the swarm signs and reads with it.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.storage = PetalStorage(vouch=self._vouches)
        self.nodes: dict[bytes, MemoryDHT] = {}

    def _vouches(self, public_key: bytes, source: str) -> bool:
        """An entry is vouched for while its signer's node runs on the swarm (the UDP DHT: while it answers us)."""
        return hashlib.sha1(public_key).digest() in self.nodes

    def store(self, key: str, records: Sequence[bytes], source: str) -> int:
        """Merge raw ``records`` as a store RPC from ``source`` would (no signing, no checks of ours). Returns how
        many were taken; a refused record is skipped, as the UDP DHT does."""
        taken = 0
        for record in records:
            try:
                self.storage.merge(key_digest(key), record, now=self.clock(), source=source_of(source))
                taken += 1
            except RecordError as e:
                log.info("refused record from %s under %r: %s", source, key, e)
        return taken


class MemoryDHT:
    """A ``SwarmDHT`` in memory: ``start()``, use, ``stop()``, like ``DHT``; every node on a swarm sees the rest."""

    def __init__(self, identity: Identity, swarm: MemorySwarm | None = None, address: str = "127.0.0.1") -> None:
        self.identity = identity
        self.swarm = MemorySwarm() if swarm is None else swarm
        self.address = address
        self._signer = EntrySigner(identity, self.swarm.clock)
        self._running = False

    @property
    def node_id(self) -> bytes:
        node_id: bytes = self.identity.dht_node_id
        return node_id

    @property
    def storage(self) -> PetalStorage:
        """The swarm's shared store (the UDP ``DHT`` has one per node)."""
        return self.swarm.storage

    async def start(self, bootstrap: Sequence[tuple[str, int]] = ()) -> None:
        """Join the swarm; ``bootstrap`` is accepted for ``DHT``'s signature and ignored (every node sees all)."""
        if self.node_id in self.swarm.nodes:
            raise RuntimeError(f"a DHT node with id {self.node_id.hex()} is already running on this MemorySwarm")
        self.swarm.nodes[self.node_id] = self
        self._running = True

    async def stop(self) -> None:
        """Leave the swarm. Entries already stored stay until they expire, as on the network."""
        if self._running:
            self._running = False
            self.swarm.nodes.pop(self.node_id, None)
        await asyncio.sleep(0)

    def routing_table_size(self) -> int:
        """How many other nodes this one knows: every other running node on the swarm."""
        return len(self.swarm.nodes) - 1 if self._running else 0

    def _check_running(self) -> None:
        if not self._running:
            raise RuntimeError("DHT not started; await dht.start() first")

    async def get(self, key: str) -> list[Entry]:
        """Every signer's current entry under ``key``, freshest first."""
        self._check_running()
        await asyncio.sleep(0)  # a lookup yields (and can be cancelled) in the real DHT too
        entries: list[Entry] = self.swarm.storage.entries(key_digest(key), now=self.swarm.clock())
        return entries

    async def get_many(self, keys: Sequence[str]) -> dict[str, list[Entry]]:
        """``get`` for several keys at once."""
        results = await asyncio.gather(*(self.get(k) for k in keys))
        return dict(zip(keys, results, strict=True))

    async def announce(self, key: str, value: dict[str, Any], ttl: float) -> int:
        """Sign ``value`` under ``key`` for ``ttl`` seconds and store it. Returns 1 if stored, 0 if refused.

        Raises RecordError for a bad value or TTL, like ``DHT.announce``.
        """
        self._check_running()
        record = self._signer.sign(key, value, ttl).to_record()
        await asyncio.sleep(0)
        try:
            self.swarm.storage.merge(key_digest(key), record, now=self.swarm.clock(), source=source_of(self.address))
        except RecordError as e:
            log.warning("could not store our own entry for %r: %s", key, e)
            return 0
        return 1

    async def withdraw(self, key: str) -> None:
        """Replace our entry under ``key`` with a short-lived 'offline' one (others' entries are untouched)."""
        await self.announce(key, self._signer.withdrawal(key), WITHDRAW_TTL)


if TYPE_CHECKING:

    def _implements_swarm_dht(dht: MemoryDHT) -> SwarmDHT:
        return dht  # mypy checks MemoryDHT against the SwarmDHT Protocol here
