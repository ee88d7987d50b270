"""The DHT facade: ``DHT``, one Kademlia node per ``petald`` storing signed, per-server, expiring entries.

We extend the ``kademlia`` package rather than fork it: ``PetalStorage`` (``storage.py``) replaces its storage,
``PetalProtocol`` (``rpc.py``) its RPC handlers, and ``DHT`` here its ``get``/``set`` (the package's ``get``
returns a local copy first and its spider stops at the first value; its lock-step rounds wait 5 s per dead
contact). ``DHT`` implements ``SwarmDHT`` (``interface.py``); ``MemoryDHT`` (``memory.py``) is its in-memory twin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kademlia.network import Server
from kademlia.node import Node, NodeHeap

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.dht.rpc import MAX_RECORDS_PER_STORE, PetalProtocol, RpcResult, parse_nodes, valid_id
from petal.daemon.dht.signer import WITHDRAW_TTL, EntrySigner
from petal.daemon.dht.storage import LOCAL_SOURCE, PetalStorage
from petal.daemon.identity import Identity
from petal.protocol.records import MODELS_KEY, Entry, RecordError, block_key, key_digest, verify_entry

__all__ = ["DHT", "MODELS_KEY", "WITHDRAW_TTL", "block_key"]

log = logging.getLogger(__name__)


class _PetalServer(Server):  # type: ignore[misc, unused-ignore]  # kademlia is untyped: Any base (strict)
    def __init__(self, ksize: int, alpha: int, node_id: bytes, storage: PetalStorage, rpc_timeout: float) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=storage)
        self.rpc_timeout = rpc_timeout

    def _create_protocol(self) -> PetalProtocol:
        return PetalProtocol(self.node, self.storage, self.ksize, self.rpc_timeout)


class DHT:
    """A Kademlia node that stores signed per-server entries. One per ``petald``.

    ``get`` crawls the k nodes closest to the key and unions what they hold; ``announce`` stores to them.
    Dead contacts cost one ``rpc_timeout`` and are then dropped from the routing table.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rpc_timeout: float = 1.0,
        ksize: int = 20,
        parallelism: int = 8,
    ) -> None:
        self.identity = identity
        self.host, self._requested_port = host, port
        self.ksize, self.parallelism = ksize, parallelism
        self.storage = PetalStorage()
        self._server = _PetalServer(ksize, 3, identity.dht_node_id, self.storage, rpc_timeout)
        self._signer = EntrySigner(identity)

    @property
    def protocol(self) -> PetalProtocol:
        if self._server.protocol is None:
            raise RuntimeError("DHT not started; await dht.start() first")
        protocol: PetalProtocol = self._server.protocol
        return protocol

    @property
    def node_id(self) -> bytes:
        node_id: bytes = self._server.node.id
        return node_id

    @property
    def port(self) -> int:
        if self._server.transport is None:
            raise RuntimeError("DHT not started; await dht.start() first")
        port: int = self._server.transport.get_extra_info("sockname")[1]
        return port

    async def start(self, bootstrap: Sequence[tuple[str, int]] = ()) -> None:
        """Listen (port 0 = ephemeral) and join through any reachable bootstrap address."""
        await self._server.listen(self._requested_port, interface=self.host)
        addrs = [(a[0], a[1]) for a in bootstrap if (a[0], a[1]) != (self.host, self.port)]
        if not addrs:
            return
        replies = await asyncio.gather(*(self.protocol._call(a, "ping", self.node_id) for a in addrs))
        reached = 0
        for addr, (ok, nodeid) in zip(addrs, replies, strict=True):
            if ok and valid_id(nodeid) and nodeid != self.node_id:
                self.protocol.welcome_if_new(Node(nodeid, addr[0], addr[1]))
                reached += 1
        if not reached:
            log.warning("no DHT bootstrap peer answered (%s); running alone until one contacts us", addrs)
            return
        await self._lookup(self.node_id, values=False)  # fill the routing table around our own id

    async def stop(self) -> None:
        if self._server.protocol is not None:
            self._server.protocol.close()
        self._server.stop()
        await asyncio.sleep(0)  # let cancelled tasks unwind

    def routing_table_size(self) -> int:
        if self._server.protocol is None:
            return 0
        return sum(len(b) for b in self.protocol.router.buckets)

    # -- lookups --

    async def _lookup(self, target: bytes, *, values: bool) -> tuple[list[Node], list[bytes]]:
        """Iterative Kademlia lookup with up to ``parallelism`` requests in flight at once.

        Unlike the package's spider, a new request goes out as soon as any reply arrives (no lock-step
        rounds), a value does not stop the crawl, and a node that timed out is never re-queried in the
        same lookup. Returns the closest responsive nodes (≤ k) and all records seen.
        """
        protocol = self.protocol
        target_node = Node(target)
        shortlist = NodeHeap(target_node, self.ksize)
        shortlist.push(protocol.router.find_neighbors(target_node, self.ksize))
        responded: set[bytes] = set()
        failed: set[bytes] = set()
        records: list[bytes] = []
        in_flight: dict[asyncio.Future[RpcResult], Node] = {}
        call = protocol.call_find_value if values else protocol.call_find_node
        try:
            while True:
                for node in shortlist.get_uncontacted():
                    if len(in_flight) >= self.parallelism:
                        break
                    shortlist.mark_contacted(node)
                    in_flight[asyncio.ensure_future(call(node, target_node))] = node
                if not in_flight:
                    break
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    node = in_flight.pop(fut)
                    ok, reply = fut.result()
                    if not ok:
                        failed.add(node.id)
                        shortlist.remove([node.id])
                        continue
                    responded.add(node.id)
                    if values and isinstance(reply, dict):
                        got = reply.get("v")
                        if isinstance(got, list):
                            records.extend(r for r in got[:MAX_RECORDS_PER_STORE] if isinstance(r, bytes))
                        reply = reply.get("n")
                    shortlist.push(
                        [
                            n
                            for n in parse_nodes(reply, self.node_id)
                            if n.id not in failed and not protocol.is_unresponsive(n.id)
                        ]
                    )
        finally:
            for fut in in_flight:
                fut.cancel()
        return [n for n in shortlist if n.id in responded], records

    async def get(self, key: str) -> list[Entry]:
        """Every server's current entry under ``key``, verified, from the k closest nodes and our own store."""
        dkey = key_digest(key)
        _, records = await self._lookup(dkey, values=True)
        now = time.time()
        newest: dict[bytes, Entry] = {e.public_key: e for e in self.storage.entries(dkey, now)}
        for record in set(records):  # the k closest mostly hold the same records: verify each once
            try:
                entry = verify_entry(record, key=key, now=now)
            except RecordError as e:
                log.info("ignoring bad record for %r from the network: %s", key, e)
                continue
            have = newest.get(entry.public_key)
            if have is None or entry.issued_at > have.issued_at:
                newest[entry.public_key] = entry
        return sorted(newest.values(), key=lambda e: -e.issued_at)

    async def get_many(self, keys: Sequence[str]) -> dict[str, list[Entry]]:
        """``get`` for several keys at once (e.g. every block of a model), lookups running concurrently."""
        results = await asyncio.gather(*(self.get(k) for k in keys))
        return dict(zip(keys, results, strict=True))

    async def announce(self, key: str, value: dict[str, Any], ttl: float) -> int:
        """Sign ``value`` under ``key`` for ``ttl`` seconds and store it on the k closest nodes.

        Returns how many nodes (this one included) accepted it. Raises RecordError for a bad value or TTL.
        """
        record = self._signer.sign(key, value, ttl).to_record()
        dkey = key_digest(key)
        nodes, _ = await self._lookup(dkey, values=False)
        accepted = 0
        target = Node(dkey)
        if len(nodes) < self.ksize or self._server.node.distance_to(target) < max(n.distance_to(target) for n in nodes):
            try:
                self.storage.merge(dkey, record, source=LOCAL_SOURCE)
                accepted += 1
            except RecordError as e:
                log.warning("could not store our own entry for %r locally: %s", key, e)
        results = await asyncio.gather(*(self.protocol.call_store(n, dkey, [record]) for n in nodes))
        accepted += sum(1 for ok, taken in results if ok and isinstance(taken, int) and taken > 0)
        return accepted

    async def withdraw(self, key: str) -> None:
        """Replace our entry under ``key`` with a short-lived 'offline' one (others' entries are untouched)."""
        await self.announce(key, self._signer.withdrawal(key), WITHDRAW_TTL)


if TYPE_CHECKING:

    def _implements_swarm_dht(dht: DHT) -> SwarmDHT:
        return dht  # mypy checks DHT against the SwarmDHT Protocol here
