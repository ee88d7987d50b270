"""The DHT node: signed, per-server-merged, expiring records on top of the ``kademlia`` package.

We extend kademlia rather than fork it: ``PetalStorage`` replaces its storage (merge by signer, expiry,
replay protection), ``PetalProtocol`` its RPC handlers (verification, hardening against garbage, short
per-RPC timeouts), and ``DHT`` its ``get``/``set`` (the package's ``get`` returns a local copy first and its
spider stops at the first value; its lock-step rounds wait 5 s per dead contact).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from hashlib import sha1
from typing import Any

import msgpack
from kademlia.network import Server
from kademlia.node import Node, NodeHeap
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage

from petal.daemon.identity import Identity
from petal.protocol.records import (
    MAX_CLOCK_SKEW,
    MAX_DATAGRAM,
    MAX_TTL,
    MODELS_KEY,
    OFFLINE,
    STATE_FIELD,
    VALUE_BUDGET,
    Entry,
    RecordError,
    block_key,
    key_digest,
    sign_entry,
    verify_entry,
)

__all__ = ["DHT", "MODELS_KEY", "WITHDRAW_TTL", "PetalProtocol", "PetalStorage", "block_key"]

log = logging.getLogger(__name__)

ID_BYTES = 20
HEADER_BYTES = 21  # rpcudp: 1 type byte + 20-byte message id
MAX_KEYS = 100_000  # distinct keys one node stores; beyond this new keys are refused
MAX_RECORDS_PER_STORE = 64
WITHDRAW_TTL = 120.0
UNRESPONSIVE_SECONDS = 30.0
"""A contact that timed out is skipped by lookups this long, unless it talks to us again first: other
nodes keep naming a dead peer until they time out on it themselves, and each mention would cost a timeout."""
ALLOWED_RPCS = frozenset({"ping", "store", "find_node", "find_value"})


def _pack(obj: Any) -> bytes:
    """rpcudp's wire encoding (msgpack) with the C library: umsgpack was 2/3 of a lookup's CPU."""
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class PetalStorage(IStorage):
    """Per key: one verified record per signer, the freshest kept within VALUE_BUDGET bytes.

    Keyed by the kademlia digest of the string key; each record names its string key inside the signed
    payload, and we check it hashes to the digest it is stored under.
    """

    def __init__(self, value_budget: int = VALUE_BUDGET) -> None:
        self.value_budget = value_budget
        self._data: dict[bytes, dict[bytes, tuple[Entry, bytes]]] = {}
        # signer -> newest issued_at seen, kept after the entry expires so an old entry cannot be replayed
        self._high_water: dict[bytes, dict[bytes, float]] = {}

    # -- merging --

    def merge(self, dkey: bytes, record: bytes, now: float | None = None) -> Entry:
        """Verify and merge one record. Returns the stored Entry; raises RecordError saying why not."""
        now = time.time() if now is None else now
        entry = verify_entry(record, now=now)
        if key_digest(entry.key) != dkey:
            raise RecordError(f"record for key {entry.key!r} stored under a different key digest")
        self._cull(dkey, now)
        entries = self._data.get(dkey)
        if entries is None:
            if len(self._data) >= MAX_KEYS:
                raise RecordError("node stores too many keys")
            entries = self._data[dkey] = {}
        hw = self._high_water.setdefault(dkey, {})
        newest = hw.get(entry.public_key)
        if newest is not None and entry.issued_at <= newest:
            if not entries:
                self._drop_if_empty(dkey)
            raise RecordError("not newer than the signer's stored entry (replay or duplicate)")
        entries[entry.public_key] = (entry, bytes(record))
        hw[entry.public_key] = entry.issued_at
        self._trim(entries)
        if entry.public_key not in entries:
            raise RecordError("key is full of fresher entries")
        return entry

    def _trim(self, entries: dict[bytes, tuple[Entry, bytes]]) -> None:
        """Evict the stalest entries until the key fits its byte budget (so one reply fits one datagram)."""
        total = sum(len(r) for _, r in entries.values())
        for e, r in sorted(entries.values(), key=lambda er: er[0].issued_at):
            if total <= self.value_budget:
                break
            total -= len(r)
            del entries[e.public_key]

    def _cull(self, dkey: bytes, now: float) -> None:
        entries = self._data.get(dkey)
        if entries:
            for pk in [pk for pk, (e, _) in entries.items() if e.expires_at <= now]:
                del entries[pk]
        hw = self._high_water.get(dkey)
        if hw:
            horizon = now - MAX_TTL - MAX_CLOCK_SKEW
            for pk in [pk for pk, t in hw.items() if t < horizon]:
                del hw[pk]
        self._drop_if_empty(dkey)

    def _drop_if_empty(self, dkey: bytes) -> None:
        if not self._data.get(dkey):
            self._data.pop(dkey, None)
        if not self._high_water.get(dkey):
            self._high_water.pop(dkey, None)

    # -- reading --

    def entries(self, dkey: bytes, now: float | None = None) -> list[Entry]:
        """Unexpired entries under a key, freshest first."""
        return [e for e, _ in self._sorted(dkey, now)]

    def records(self, dkey: bytes, now: float | None = None) -> list[bytes]:
        """Unexpired wire records under a key, freshest first (what find_value replies carry)."""
        return [r for _, r in self._sorted(dkey, now)]

    def _sorted(self, dkey: bytes, now: float | None) -> list[tuple[Entry, bytes]]:
        self._cull(dkey, time.time() if now is None else now)
        return sorted(self._data.get(dkey, {}).values(), key=lambda er: -er[0].issued_at)

    def keys(self) -> list[bytes]:
        return list(self._data)

    # -- kademlia's IStorage interface (used by welcome_if_new replication and the hourly refresh) --

    def __setitem__(self, dkey: bytes, value: bytes | list[bytes]) -> None:
        for record in value if isinstance(value, list) else [value]:
            try:
                self.merge(dkey, record)
            except RecordError as e:
                log.debug("not storing record under %s: %s", dkey.hex(), e)

    def __getitem__(self, dkey: bytes) -> list[bytes]:
        records = self.records(dkey)
        if not records:
            raise KeyError(dkey)
        return records

    def get(self, dkey: bytes, default: Any = None) -> Any:
        return self.records(dkey) or default

    def iter_older_than(self, seconds_old: float) -> list:
        return []  # owners re-announce before expiry; holders never republish others' entries

    def __iter__(self) -> Iterable[tuple[bytes, list[bytes]]]:
        for dkey in self.keys():
            records = self.records(dkey)
            if records:
                yield dkey, records


def _valid_id(x: Any) -> bool:
    return isinstance(x, bytes) and len(x) == ID_BYTES


def _parse_nodes(raw: Any, own_id: bytes) -> list[Node]:
    """Contacts from a peer's reply; anything malformed is skipped (never trust the network)."""
    nodes = []
    if not isinstance(raw, list):
        return nodes
    for item in raw[:64]:
        if (
            isinstance(item, (list, tuple))
            and len(item) == 3
            and _valid_id(item[0])
            and item[0] != own_id
            and isinstance(item[1], str)
            and len(item[1]) <= 64
            and isinstance(item[2], int)
            and 0 < item[2] < 65536
        ):
            nodes.append(Node(item[0], item[1], item[2]))
    return nodes


class PetalProtocol(KademliaProtocol):
    """kademlia's protocol with verified, merging stores; replies sized for one datagram; garbage dropped."""

    def __init__(self, source_node: Node, storage: PetalStorage, ksize: int, rpc_timeout: float) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = rpc_timeout
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self.dropped = 0  # bad datagrams seen, for tests and metrics
        self.unresponsive: dict[bytes, float] = {}  # node id -> monotonic time it last timed out

    def is_unresponsive(self, node_id: bytes) -> bool:
        since = self.unresponsive.get(node_id)
        if since is None:
            return False
        if time.monotonic() - since > UNRESPONSIVE_SECONDS:
            del self.unresponsive[node_id]
            return False
        return True

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        if result[0]:
            self.unresponsive.pop(node.id, None)
        elif not self._closed:
            self.unresponsive[node.id] = time.monotonic()
            if len(self.unresponsive) > 4096:
                self.unresponsive.pop(next(iter(self.unresponsive)))
        return super().handle_call_response(result, node)

    # -- hardening the rpcudp layer --

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self._closed:
            return
        try:
            self._solve(data, addr)
        except Exception as e:  # a bad datagram must never take the node down
            self.dropped += 1
            log.warning("dropped bad datagram (%d bytes) from %s: %s: %s", len(data), addr, type(e).__name__, e)

    def _solve(self, datagram: bytes, address: tuple) -> None:
        if len(datagram) < HEADER_BYTES + 1:
            raise ValueError("too short")
        kind, msg_id = datagram[:1], datagram[1:HEADER_BYTES]
        data = _unpack(datagram[HEADER_BYTES:])
        if kind == b"\x00":
            if not (
                isinstance(data, list)
                and len(data) == 2
                and isinstance(data[0], str)
                and isinstance(data[1], list)
                and data[0] in ALLOWED_RPCS
            ):
                raise ValueError("request is not [known rpc name, [args]]")
            self._spawn(self._serve(msg_id, data[0], data[1], address))
        elif kind == b"\x01":
            self._accept_response(msg_id, data, address)
        else:
            raise ValueError(f"unknown message type {kind!r}")

    async def _serve(self, msg_id: bytes, name: str, args: list, address: tuple) -> None:
        try:
            response = getattr(self, f"rpc_{name}")(address, *args)
        except Exception as e:
            self.dropped += 1
            log.warning("dropped bad %s request from %s: %s", name, address, e)
            return
        reply = b"\x01" + msg_id + _pack(response)
        if len(reply) > MAX_DATAGRAM:  # cannot happen with the budgets below; never send what will not arrive
            log.error("reply to %s from %s is %d bytes, over %d; not sent", name, address, len(reply), MAX_DATAGRAM)
            return
        if self.transport is not None and not self._closed:
            self.transport.sendto(reply, address)

    async def _call(self, address: tuple, name: str, *args: Any) -> tuple[bool, Any]:
        """One RPC with this node's timeout. Returns (responded, reply) like rpcudp."""
        if self._closed or self.transport is None:
            return False, None
        msg_id = sha1(os.urandom(32)).digest()
        data = b"\x00" + msg_id + _pack([name, list(args)])
        if len(data) > MAX_DATAGRAM:
            raise RecordError(f"{name} request is {len(data)} bytes, over the {MAX_DATAGRAM}-byte datagram limit")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timer)
        self.transport.sendto(data, address)
        return await future

    def _timeout(self, msg_id: bytes) -> None:
        future, _ = self._outstanding.pop(msg_id, (None, None))
        if future is not None and not future.done():
            future.set_result((False, None))

    def close(self) -> None:
        """Answer every outstanding call with 'no response' and cancel background work."""
        self._closed = True
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        for task in list(self._tasks):
            task.cancel()

    # -- RPC handlers (validated: arguments come straight off the network) --

    def _sender(self, sender: tuple, nodeid: Any) -> Node:
        if not _valid_id(nodeid):
            raise ValueError("node id must be 20 bytes")
        source = Node(nodeid, sender[0], sender[1])
        if nodeid != self.source_node.id:
            self.unresponsive.pop(nodeid, None)
            self.welcome_if_new(source)
        return source

    def rpc_ping(self, sender: tuple, nodeid: bytes) -> bytes:
        self._sender(sender, nodeid)
        return self.source_node.id

    def rpc_store(self, sender: tuple, nodeid: bytes, key: bytes, value: Any) -> int:
        """Merge a record (or a list of records, when a peer replicates a key to us). Returns how many were taken."""
        self._sender(sender, nodeid)
        if not _valid_id(key):
            raise ValueError("key must be a 20-byte digest")
        records = value if isinstance(value, list) else [value]
        accepted = 0
        for record in records[:MAX_RECORDS_PER_STORE]:
            try:
                self.storage.merge(key, record)
                accepted += 1
            except RecordError as e:
                log.info("refused record from %s under %s: %s", sender, key.hex(), e)
        return accepted

    def rpc_find_node(self, sender: tuple, nodeid: bytes, key: bytes) -> list:
        source = self._sender(sender, nodeid)
        if not _valid_id(key):
            raise ValueError("key must be a 20-byte id")
        neighbors = self.router.find_neighbors(Node(key), exclude=source)
        return [list(n) for n in neighbors]

    def rpc_find_value(self, sender: tuple, nodeid: bytes, key: bytes) -> dict:
        """Records AND closer contacts, so a lookup can go on collecting every server's entry."""
        nodes = self.rpc_find_node(sender, nodeid, key)
        reply = {"v": self.storage.records(key), "n": nodes}
        while nodes and HEADER_BYTES + len(_pack(reply)) > MAX_DATAGRAM:
            nodes.pop()
        return reply

    # -- client calls routed through _call (short timeout, dead contacts dropped by handle_call_response) --

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "ping", self.source_node.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "store", self.source_node.id, key, value)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "find_node", self.source_node.id, node_to_find.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        result = await self._call(
            (node_to_ask.ip, node_to_ask.port), "find_value", self.source_node.id, node_to_find.id
        )
        return self.handle_call_response(result, node_to_ask)

    def welcome_if_new(self, node: Node) -> None:
        """kademlia's replication to newcomers, but with tracked tasks (stopped with the node)."""
        if self._closed or not self.router.is_new_node(node):
            return
        for dkey, records in self.storage:
            keynode = Node(dkey)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
            if not neighbors or (new_node_close and this_closest):
                self._spawn(self.call_store(node, dkey, records))
        self.router.add_contact(node)


class _PetalServer(Server):
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
        self._announced: dict[str, dict] = {}
        self._last_issued = 0.0

    @property
    def protocol(self) -> PetalProtocol:
        if self._server.protocol is None:
            raise RuntimeError("DHT not started; await dht.start() first")
        return self._server.protocol

    @property
    def node_id(self) -> bytes:
        return self._server.node.id

    @property
    def port(self) -> int:
        if self._server.transport is None:
            raise RuntimeError("DHT not started; await dht.start() first")
        return self._server.transport.get_extra_info("sockname")[1]

    async def start(self, bootstrap: Sequence[tuple[str, int]] = ()) -> None:
        """Listen (port 0 = ephemeral) and join through any reachable bootstrap address."""
        await self._server.listen(self._requested_port, interface=self.host)
        addrs = [tuple(a) for a in bootstrap if (a[0], a[1]) != (self.host, self.port)]
        if not addrs:
            return
        replies = await asyncio.gather(*(self.protocol._call(a, "ping", self.node_id) for a in addrs))
        reached = 0
        for addr, (ok, nodeid) in zip(addrs, replies):
            if ok and _valid_id(nodeid) and nodeid != self.node_id:
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
        in_flight: dict[asyncio.Future, Node] = {}
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
                            for n in _parse_nodes(reply, self.node_id)
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
        return dict(zip(keys, results))

    def _issue_time(self) -> float:
        """Strictly increasing, so two announces in one clock tick still replace each other."""
        now = max(time.time(), self._last_issued + 1e-6)
        self._last_issued = now
        return now

    async def announce(self, key: str, value: dict, ttl: float) -> int:
        """Sign ``value`` under ``key`` for ``ttl`` seconds and store it on the k closest nodes.

        Returns how many nodes (this one included) accepted it. Raises RecordError for a bad value or TTL.
        """
        if not 0 < ttl <= MAX_TTL:
            raise RecordError(f"ttl must be in (0, {MAX_TTL:.0f}] seconds, got {ttl}; re-announce periodically")
        issued_at = self._issue_time()
        entry = sign_entry(self.identity, key, value, issued_at=issued_at, expires_at=issued_at + ttl)
        if entry.state != OFFLINE:
            self._announced[key] = dict(value)
        record = entry.to_record()
        dkey = key_digest(key)
        nodes, _ = await self._lookup(dkey, values=False)
        accepted = 0
        target = Node(dkey)
        if len(nodes) < self.ksize or self._server.node.distance_to(target) < max(n.distance_to(target) for n in nodes):
            try:
                self.storage.merge(dkey, record)
                accepted += 1
            except RecordError as e:
                log.warning("could not store our own entry for %r locally: %s", key, e)
        results = await asyncio.gather(*(self.protocol.call_store(n, dkey, [record]) for n in nodes))
        accepted += sum(1 for ok, taken in results if ok and isinstance(taken, int) and taken > 0)
        return accepted

    async def withdraw(self, key: str) -> None:
        """Replace our entry under ``key`` with a short-lived 'offline' one (others' entries are untouched)."""
        value = dict(self._announced.pop(key, {}))
        value[STATE_FIELD] = OFFLINE
        await self.announce(key, value, WITHDRAW_TTL)
