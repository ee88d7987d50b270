"""The DHT's wire side: ``PetalProtocol``, kademlia's UDP RPC handlers and calls, hardened.

Replaces the ``kademlia`` package's protocol: stores are verified and merged (``PetalStorage``), every reply is
sized to fit one datagram, malformed datagrams and requests are dropped (counted in ``dropped``), calls use a
short per-node timeout, and a contact that timed out is remembered as unresponsive for a while.

Every stored record is charged to the address that delivered it (``source_of`` the UDP sender), also when an
honest node replicates others' entries to a newcomer (kademlia's ``welcome_if_new``): we cannot tell an honest
relay from a hostile one, and charging the relay is what keeps a relay from laundering a flood onto other
addresses. Such relayed entries sit in the relay's share until their signers re-announce to us directly
(every server does, periodically), which charges them to the signers' own addresses. A node that stores a record
with us is pinged once to check that it answers; its entries then outrank those of identities never seen
(``vouches``). Source addresses are only as trustworthy as UDP source addresses: this defends against many
identities on a few addresses, not against a spoofer of many addresses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from hashlib import sha1
from typing import Any, TypeGuard

import msgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from petal.daemon.dht.storage import LOCAL_SOURCE, PetalStorage, source_of
from petal.protocol.records import MAX_DATAGRAM, RecordError

__all__ = ["LIVE_SECONDS", "MAX_RECORDS_PER_STORE", "PetalProtocol", "RpcResult", "parse_nodes", "valid_id"]

log = logging.getLogger(__name__)

ID_BYTES = 20
HEADER_BYTES = 21  # rpcudp: 1 type byte + 20-byte message id
MAX_RECORDS_PER_STORE = 64
UNRESPONSIVE_SECONDS = 30.0
"""A contact that timed out is skipped by lookups this long, unless it talks to us again first: other
nodes keep naming a dead peer until they time out on it themselves, and each mention would cost a timeout."""
LIVE_SECONDS = 600.0
"""A node that answered our ping this recently vouches for its entries (servers re-announce more often)."""
MAX_REMEMBERED = 4096  # contacts remembered as unresponsive / as having answered (oldest forgotten first)
MAX_VERIFYING = 64  # verification pings to storing nodes in flight at once
ALLOWED_RPCS = frozenset({"ping", "store", "find_node", "find_value"})

Address = tuple[str, int]
RpcResult = tuple[bool, object]
"""What every call returns, like rpcudp: (the peer responded, its reply as decoded off the wire, unvalidated)."""


def _pack(obj: object) -> bytes:
    """rpcudp's wire encoding (msgpack) with the C library: umsgpack was 2/3 of a lookup's CPU."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(data: bytes) -> object:
    return msgpack.unpackb(data, raw=False)


def valid_id(x: object) -> TypeGuard[bytes]:
    """Whether ``x`` is a 20-byte node id or key digest (anything off the network must be checked)."""
    return isinstance(x, bytes) and len(x) == ID_BYTES


def parse_nodes(raw: object, own_id: bytes) -> list[Node]:
    """Contacts from a peer's reply; anything malformed is skipped (never trust the network)."""
    nodes: list[Node] = []
    if not isinstance(raw, list):
        return nodes
    for item in raw[:64]:
        if (
            isinstance(item, (list, tuple))
            and len(item) == 3
            and valid_id(item[0])
            and item[0] != own_id
            and isinstance(item[1], str)
            and len(item[1]) <= 64
            and isinstance(item[2], int)
            and 0 < item[2] < 65536
        ):
            nodes.append(Node(item[0], item[1], item[2]))
    return nodes


class PetalProtocol(KademliaProtocol):  # type: ignore[misc, unused-ignore]  # kademlia is untyped: Any base (strict)
    """kademlia's protocol with verified, merging stores; replies sized for one datagram; garbage dropped."""

    def __init__(self, source_node: Node, storage: PetalStorage, ksize: int, rpc_timeout: float) -> None:
        super().__init__(source_node, storage, ksize)
        self.storage: PetalStorage = storage
        self._wait_timeout = rpc_timeout
        self._closed = False
        self._tasks: set[asyncio.Task[object]] = set()
        self.dropped = 0  # bad datagrams seen, for tests and metrics
        self.unresponsive: dict[bytes, float] = {}  # node id -> monotonic time it last timed out
        self.answered: dict[bytes, float] = {}  # node id -> monotonic time it last answered our ping, with its id
        self._verifying: set[bytes] = set()  # storing nodes being pinged to see whether they answer
        storage.vouch = self.vouches

    def is_unresponsive(self, node_id: bytes) -> bool:
        since = self.unresponsive.get(node_id)
        if since is None:
            return False
        if time.monotonic() - since > UNRESPONSIVE_SECONDS:
            del self.unresponsive[node_id]
            return False
        return True

    def vouches(self, public_key: bytes, source: str) -> bool:
        """Whether the DHT node of the signer ``public_key`` answered our ping, with its id, in the last LIVE_SECONDS.

        A node's id is the SHA-1 of its identity's public key, so a server's entries are vouched for by its own
        node answering. Identities that never ran a node we reached (an attacker's throwaway keys) are not.
        """
        if source == LOCAL_SOURCE:
            return True
        node_id = sha1(public_key).digest()
        if node_id == self.source_node.id:
            return True
        since = self.answered.get(node_id)
        return since is not None and time.monotonic() - since <= LIVE_SECONDS

    def _remember(self, table: dict[bytes, float], node_id: bytes) -> None:
        table.pop(node_id, None)
        table[node_id] = time.monotonic()
        if len(table) > MAX_REMEMBERED:
            table.pop(next(iter(table)))

    def handle_call_response(self, result: RpcResult, node: Node) -> RpcResult:
        if result[0]:
            self.unresponsive.pop(node.id, None)
        elif not self._closed:
            self._remember(self.unresponsive, node.id)
        response: RpcResult = super().handle_call_response(result, node)
        return response

    # -- hardening the rpcudp layer --

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self._closed:
            return
        try:
            self._solve(data, addr)
        except Exception as e:  # noqa: BLE001 - a bad datagram must never take the node down
            self.dropped += 1
            log.warning("dropped bad datagram (%d bytes) from %s: %s: %s", len(data), addr, type(e).__name__, e)

    def _solve(self, datagram: bytes, address: Address) -> None:
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

    async def _serve(self, msg_id: bytes, name: str, args: list[object], address: Address) -> None:
        try:
            response = getattr(self, f"rpc_{name}")(address, *args)
        except Exception as e:  # noqa: BLE001 - arguments straight off the network can fail in any way; drop them
            self.dropped += 1
            log.warning("dropped bad %s request from %s: %s", name, address, e)
            return
        reply = b"\x01" + msg_id + _pack(response)
        if len(reply) > MAX_DATAGRAM:  # cannot happen with the budgets below; never send what will not arrive
            log.error("reply to %s from %s is %d bytes, over %d; not sent", name, address, len(reply), MAX_DATAGRAM)
            return
        if self.transport is not None and not self._closed:
            self.transport.sendto(reply, address)

    async def _call(self, address: Address, name: str, *args: object) -> RpcResult:
        """One RPC with this node's timeout. Returns (responded, reply) like rpcudp."""
        if self._closed or self.transport is None:
            return False, None
        msg_id = sha1(os.urandom(32)).digest()
        data = b"\x00" + msg_id + _pack([name, list(args)])
        if len(data) > MAX_DATAGRAM:
            raise RecordError(f"{name} request is {len(data)} bytes, over the {MAX_DATAGRAM}-byte datagram limit")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RpcResult] = loop.create_future()
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

    def _sender(self, sender: Address, nodeid: object) -> Node:
        if not valid_id(nodeid):
            raise ValueError("node id must be 20 bytes")
        source = Node(nodeid, sender[0], sender[1])
        if nodeid != self.source_node.id:
            self.unresponsive.pop(nodeid, None)
            self.welcome_if_new(source)
        return source

    def rpc_ping(self, sender: Address, nodeid: bytes) -> bytes:
        self._sender(sender, nodeid)
        own_id: bytes = self.source_node.id
        return own_id

    def rpc_store(self, sender: Address, nodeid: bytes, key: bytes, value: object) -> int:
        """Merge a record (or a list of records, when a peer replicates a key to us). Returns how many were taken.

        The records are charged to the sender's address (module doc); a sender not known to answer is pinged.
        """
        source = self._sender(sender, nodeid)
        if not valid_id(key):
            raise ValueError("key must be a 20-byte digest")
        self._verify(source)
        charged = source_of(sender[0])
        records = value if isinstance(value, list) else [value]
        accepted = 0
        for record in records[:MAX_RECORDS_PER_STORE]:
            try:
                if not isinstance(record, bytes):
                    raise RecordError(f"a record must be bytes, got {type(record).__name__}")
                self.storage.merge(key, record, source=charged)
                accepted += 1
            except RecordError as e:
                log.info("refused record from %s under %s: %s", sender, key.hex(), e)
        return accepted

    def _verify(self, node: Node) -> None:
        """Ping a storing node not known to answer, so its entries can be vouched for (``vouches``)."""
        since = self.answered.get(node.id)
        if since is not None and time.monotonic() - since <= LIVE_SECONDS / 2:
            return
        busy = node.id in self._verifying or len(self._verifying) >= MAX_VERIFYING
        if busy or self._closed or node.id == self.source_node.id:
            return
        self._verifying.add(node.id)

        async def ping() -> None:
            try:
                await self.call_ping(node)
            finally:
                self._verifying.discard(node.id)

        self._spawn(ping())

    def rpc_find_node(self, sender: Address, nodeid: bytes, key: bytes) -> list[list[object]]:
        source = self._sender(sender, nodeid)
        if not valid_id(key):
            raise ValueError("key must be a 20-byte id")
        neighbors = self.router.find_neighbors(Node(key), exclude=source)
        return [list(n) for n in neighbors]

    def rpc_find_value(self, sender: Address, nodeid: bytes, key: bytes) -> dict[str, object]:
        """Records AND closer contacts, so a lookup can go on collecting every server's entry."""
        nodes = self.rpc_find_node(sender, nodeid, key)
        reply: dict[str, object] = {"v": self.storage.records(key), "n": nodes}
        while nodes and HEADER_BYTES + len(_pack(reply)) > MAX_DATAGRAM:
            nodes.pop()
        return reply

    # -- client calls routed through _call (short timeout, dead contacts dropped by handle_call_response) --

    async def call_ping(self, node_to_ask: Node) -> RpcResult:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "ping", self.source_node.id)
        if result[0] and result[1] != node_to_ask.id:
            result = (False, None)  # someone else answers at that address: the node we asked for is not there
        elif result[0]:
            self._remember(self.answered, node_to_ask.id)  # only a ping's reply names who answered
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: object) -> RpcResult:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "store", self.source_node.id, key, value)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> RpcResult:
        result = await self._call((node_to_ask.ip, node_to_ask.port), "find_node", self.source_node.id, node_to_find.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> RpcResult:
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
