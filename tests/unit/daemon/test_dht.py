"""The DHT over real UDP on 127.0.0.1: several nodes in one process, raw RPCs to test the server side."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time

import msgpack
import pytest
import umsgpack
from kademlia.node import Node

from petal.daemon.dht.network import DHT
from petal.daemon.dht.storage import MAX_SIGNERS_REMEMBERED, PetalStorage, Stored, source_of
from petal.daemon.identity import Identity
from petal.protocol.records import (
    MAX_DATAGRAM,
    MAX_RECORD_BYTES,
    MODELS_KEY,
    ModelRecord,
    RecordError,
    ServerRecord,
    block_key,
    key_digest,
    sign_entry,
)

pytestmark = pytest.mark.timeout(60)

KEY = block_key("HuggingFaceTB/SmolLM2-135M", 7)
DKEY = key_digest(KEY)


def value(identity: Identity, state: str = "online", throughput: float = 100.0) -> dict:
    addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}"
    return ServerRecord((addr,), 0, 30, state, throughput, 4096, "bfloat16", 1).to_value()


def record(identity: Identity, key: str = KEY, *, issued_at: float | None = None, ttl: float = 60.0, **kw) -> bytes:
    issued_at = time.time() if issued_at is None else issued_at
    entry = sign_entry(identity, key, kw.get("v") or value(identity), issued_at=issued_at, expires_at=issued_at + ttl)
    return entry.to_record()


@contextlib.asynccontextmanager
async def swarm(n: int, **kw):
    """n nodes, all bootstrapped from the first; every node stopped on exit."""
    nodes = [DHT(Identity.generate(), **kw) for _ in range(n)]
    try:
        await nodes[0].start()
        for node in nodes[1:]:
            await node.start([("127.0.0.1", nodes[0].port)])
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def raw_store(sender: DHT, target: DHT, dkey: bytes, records) -> tuple[bool, object]:
    """A store RPC exactly as a (possibly hostile) peer would send it, bypassing announce's checks."""
    return await sender.protocol._call(("127.0.0.1", target.port), "store", sender.node_id, dkey, records)


async def wait_until_past(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.time()) + 0.05)


async def test_three_servers_read_back_from_every_node():
    async with swarm(5) as nodes:
        assert all(n.routing_table_size() == 4 for n in nodes)
        for node in nodes[:3]:
            assert await node.announce(KEY, value(node.identity), ttl=60) == 5
        expected = {n.identity.peer_id for n in nodes[:3]}
        for node in nodes:
            entries = await node.get(KEY)
            assert {e.peer_id for e in entries} == expected
            for e in entries:
                assert ServerRecord.from_entry(e).addrs[0].endswith(e.peer_id) and e.key == KEY
        other = block_key("HuggingFaceTB/SmolLM2-135M", 8)
        assert await nodes[4].get(other) == []
        many = await nodes[3].get_many([KEY, other])
        assert {e.peer_id for e in many[KEY]} == expected and many[other] == []


async def test_get_asks_the_network_not_a_stale_local_copy():
    """A node holding an old entry of a signer still returns the newer one the network has."""
    async with swarm(3) as (a, b, c):
        alice = a.identity
        old, new = record(alice, issued_at=time.time() - 5), record(alice, v=value(alice, throughput=999.0))
        assert (await raw_store(a, b, DKEY, [new]))[1] == 1
        c.storage.merge(DKEY, old)
        (entry,) = await c.get(KEY)
        assert entry.value["t"] == 999.0


async def test_announce_replaces_own_entry_and_withdraw_marks_offline():
    async with swarm(4) as nodes:
        a, b = nodes[0], nodes[1]
        await a.announce(KEY, value(a.identity, throughput=1.0), ttl=60)
        await a.announce(KEY, value(a.identity, throughput=2.0), ttl=60)
        await b.announce(KEY, value(b.identity), ttl=60)
        entries = {e.peer_id: e for e in await nodes[3].get(KEY)}
        assert len(entries) == 2 and entries[a.identity.peer_id].value["t"] == 2.0
        await a.withdraw(KEY)
        entries = {e.peer_id: e for e in await nodes[2].get(KEY)}
        assert entries[a.identity.peer_id].state == "offline"
        assert entries[a.identity.peer_id].value["s"] == [0, 30]  # the withdrawn span stays readable
        assert entries[b.identity.peer_id].state == "online"


async def test_entry_stops_being_returned_after_expiry():
    async with swarm(3) as nodes:
        await nodes[0].announce(KEY, value(nodes[0].identity), ttl=0.6)
        (entry,) = await nodes[2].get(KEY)
        await wait_until_past(entry.expires_at)
        for node in nodes:
            assert await node.get(KEY) == []
            assert node.storage.entries(DKEY) == []


async def test_abruptly_stopped_node_entries_vanish_others_stay():
    async with swarm(5, rpc_timeout=0.3) as nodes:
        dying, staying = nodes[1], nodes[2]
        await dying.announce(KEY, value(dying.identity), ttl=1.5)
        await staying.announce(KEY, value(staying.identity), ttl=60)
        await dying.stop()  # no withdraw
        assert {e.peer_id for e in await nodes[3].get(KEY)} == {dying.identity.peer_id, staying.identity.peer_id}
        await wait_until_past(time.time() + 1.5)
        assert [e.peer_id for e in await nodes[4].get(KEY)] == [staying.identity.peer_id]


async def test_server_refuses_forged_unsigned_replayed_and_foreign_records():
    async with swarm(2) as (mallory, victim):
        alice = Identity.generate()
        good = record(alice)
        assert await raw_store(mallory, victim, DKEY, [good]) == (True, 1)

        forged = bytearray(record(alice, v=value(alice, throughput=1e9)))
        forged[3] ^= 0xFF
        unsigned = bytes(64) + record(alice, v=value(alice, throughput=1e9))[64:]
        replayed = record(alice, issued_at=time.time() - 10)
        # Mallory re-signs Alice's entry under her own key after swapping in Alice's public key: bad signature
        swapped = bytearray(record(mallory.identity))
        at = bytes(swapped).index(mallory.identity.public_key)
        swapped[at : at + 32] = alice.public_key
        other_key = record(alice, key=block_key("HuggingFaceTB/SmolLM2-135M", 8), issued_at=time.time() + 1)
        expired = record(alice, issued_at=time.time() - 100, ttl=50)
        for bad in [bytes(forged), unsigned, replayed, good, bytes(swapped), other_key, expired, b"junk", 42]:
            assert await raw_store(mallory, victim, DKEY, [bad]) == (True, 0), bad

        (entry,) = victim.storage.entries(DKEY)
        assert entry.public_key == alice.public_key and entry.value["t"] == 100.0

        # Mallory's own entry joins the set; Alice's stays
        assert (await raw_store(mallory, victim, DKEY, [record(mallory.identity)]))[1] == 1
        assert {e.public_key for e in victim.storage.entries(DKEY)} == {alice.public_key, mallory.identity.public_key}


async def test_replay_refused_after_withdrawal_expires():
    """Once a newer (offline) entry expired, the older 'online' one must not come back."""
    storage = PetalStorage()
    alice = Identity.generate()
    now = time.time()
    online = record(alice, issued_at=now - 10, ttl=600)
    offline = record(alice, issued_at=now - 5, ttl=10, v=value(alice, state="offline"))
    storage.merge(DKEY, online, now=now)
    storage.merge(DKEY, offline, now=now)
    assert storage.entries(DKEY, now=now + 6) == []
    with pytest.raises(RecordError, match="newer"):
        storage.merge(DKEY, online, now=now + 6)


async def test_get_drops_bad_records_from_the_network():
    async with swarm(3) as (a, b, c):
        alice, mallory = Identity.generate(), Identity.generate()
        assert (await raw_store(a, b, DKEY, [record(alice)]))[1] == 1
        # a lying node serves a tampered record: it bypasses its own checks
        entry = sign_entry(mallory, KEY, value(mallory), issued_at=time.time(), expires_at=time.time() + 60)
        tampered = bytearray(entry.to_record())
        tampered[-20] ^= 1
        a.storage._data.setdefault(DKEY, {})[mallory.public_key] = Stored(entry, bytes(tampered), "127.0.0.1")
        assert bytes(tampered) in a.storage.records(DKEY)
        assert [e.public_key for e in await c.get(KEY)] == [alice.public_key]
        assert a.protocol.dropped == 0  # a served the tampered record; c refused it


async def test_model_discovery_key():
    async with swarm(3) as nodes:
        for node, name in [(nodes[0], "SmolLM2-135M"), (nodes[1], "bloom-560m")]:
            model = ModelRecord(name, "sha256:" + name, 30, "llama" if "Smol" in name else "bloom")
            await node.announce(MODELS_KEY, model.to_value(), ttl=60)
        models = {ModelRecord.from_value(e.value).name for e in await nodes[2].get(MODELS_KEY)}
        assert models == {"SmolLM2-135M", "bloom-560m"}


async def test_garbage_datagrams_do_not_stop_the_node():
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    async with swarm(2) as (a, victim):
        await a.announce(KEY, value(a.identity), ttl=60)
        req = lambda payload: b"\x00" + os.urandom(20) + payload  # noqa: E731
        garbage = [
            b"",
            b"\x00",
            os.urandom(30),
            os.urandom(5000),
            req(b"\xc1\xc1"),  # reserved msgpack byte
            req(umsgpack.packb([1, 2, 3])),
            req(umsgpack.packb(["__init__", []])),
            req(umsgpack.packb(["store", [a.node_id]])),  # wrong arity
            req(umsgpack.packb(["find_node", [12345, b"x" * 20]])),  # node id not bytes
            req(umsgpack.packb(["find_value", [a.node_id, "not a digest"]])),
            req(umsgpack.packb(["store", [a.node_id, DKEY, [os.urandom(60000)]]])),  # huge value
            req(umsgpack.packb(["store", [a.node_id, DKEY, {"a": [1] * 10}]])),
            b"\x01" + os.urandom(20) + umsgpack.packb("unsolicited reply"),
            b"\x07" + os.urandom(40),
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in garbage:
                sock.sendto(datagram, ("127.0.0.1", victim.port))
        for _ in range(50):  # let the node process them
            await asyncio.sleep(0.01)
            if victim.protocol.dropped >= 11:
                break
        assert victim.protocol.dropped >= 11
        assert [e.peer_id for e in await victim.get(KEY)] == [a.identity.peer_id]
        ok, nodeid = await a.protocol._call(("127.0.0.1", victim.port), "ping", a.node_id)
        assert ok and nodeid == victim.node_id
    assert errors == [], errors


async def test_lookups_skip_a_dead_peer_after_one_timeout():
    async with swarm(10, rpc_timeout=0.3) as nodes:
        for node in nodes[:3]:
            await node.announce(KEY, value(node.identity), ttl=60)
        dead, asker = nodes[5], nodes[9]
        dead_addr = ("127.0.0.1", dead.port)
        await dead.stop()
        calls: list[tuple] = []
        original = asker.protocol._call

        async def counting(address, name, *args):
            calls.append(address)
            return await original(address, name, *args)

        asker.protocol._call = counting
        assert len(await asyncio.wait_for(asker.get(KEY), 10)) == 3
        assert calls.count(dead_addr) == 1
        assert asker.routing_table_size() == 8
        calls.clear()
        assert len(await asker.get(KEY)) == 3
        assert await asker.announce(KEY, value(asker.identity), ttl=60) == 9
        assert dead_addr not in calls


async def test_largest_reply_fits_one_datagram():
    async with swarm(2) as (asker, holder):
        for i in range(40):  # a full routing table of the longest addresses
            ip = f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i:04x}"
            holder.protocol.router.add_contact(Node(os.urandom(20), ip, 65535))
        signers = [Identity.generate() for _ in range(40)]
        now = time.time()
        big = []
        for i, s in enumerate(signers):
            v = value(s)
            v["a"] = []
            while True:  # grow the value to just under the record limit
                v["a"].append("/ip6/2001:db8::1/tcp/65535")
                try:
                    sign_entry(s, KEY, v, issued_at=now, expires_at=now + 60)
                except RecordError:
                    v["a"].pop()
                    break
            big.append(record(s, issued_at=now + i * 0.001, v=v))
        assert all(len(r) > MAX_RECORD_BYTES - 40 for r in big)
        for r in big:
            await raw_store(asker, holder, DKEY, [r])
        ok, reply = await asker.protocol._call(("127.0.0.1", holder.port), "find_value", asker.node_id, DKEY)
        assert ok and reply["n"]
        size = 21 + len(umsgpack.packb(reply))
        assert size <= MAX_DATAGRAM
        kept = set(reply["v"])
        assert kept == set(big[-len(kept) :]) and len(kept) >= 8  # the freshest survive
        assert {e.peer_id for e in await asker.get(KEY)} == {signers[i].peer_id for i in range(40 - len(kept), 40)}
        print(f"largest find_value reply: {size} bytes, {len(kept)} entries of ~{len(big[0])} bytes")


async def test_lone_node_and_bad_arguments():
    async with swarm(1) as (node,):
        assert await node.announce(KEY, value(node.identity), ttl=60) == 1
        assert len(await node.get(KEY)) == 1
        with pytest.raises(RecordError):
            await node.announce(KEY, value(node.identity), ttl=10_000)
        with pytest.raises(RecordError):
            await node.announce(KEY, {"x": object()}, ttl=10)
    with pytest.raises(RuntimeError, match="start"):
        _ = DHT(Identity.generate()).port


async def test_bootstrap_to_nobody_runs_alone():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        silent = sock.getsockname()
        node = DHT(Identity.generate(), rpc_timeout=0.2)
        try:
            await node.start([silent])
            assert node.routing_table_size() == 0
            assert await node.announce(KEY, value(node.identity), ttl=60) == 1
        finally:
            await node.stop()


def test_msgpack_is_what_rpcudp_speaks():
    """Records travel as msgpack bin inside rpcudp's umsgpack; both libraries must agree on the bytes."""
    r = record(Identity.generate())
    assert msgpack.unpackb(umsgpack.packb([r]))[0] == r


# -- issue #16 finding 13: a key's room is not for whoever signs the most identities or dates them furthest ahead --


def full_size(identity: Identity, *, issued_at: float, key: str = KEY) -> bytes:
    """A record of ``identity`` padded to just under MAX_RECORD_BYTES, valid for 600 s from ``issued_at``."""
    v = value(identity)
    v["x"], kept = "", b""
    while True:
        v["x"] += "A" * 8
        try:
            entry = sign_entry(identity, key, v, issued_at=issued_at, expires_at=issued_at + 600)
        except RecordError:
            return kept
        kept = entry.to_record()


def test_a_full_key_is_shared_by_source_address():
    """Forty full-size, future-dated identities from one address compete with each other, not with other sources."""
    storage, now = PetalStorage(), time.time()
    honest = [Identity.generate() for _ in range(3)]
    for i, h in enumerate(honest):
        storage.merge(DKEY, record(h, issued_at=now - 30), now=now, source=f"10.0.0.{i + 1}")
    fakes = [Identity.generate() for _ in range(40)]
    taken = 0
    for f in fakes:
        with contextlib.suppress(RecordError):
            storage.merge(DKEY, full_size(f, issued_at=now + 59), now=now, source="10.9.9.9")
            taken += 1
    held = {e.public_key for e in storage.entries(DKEY, now=now)}
    assert {h.public_key for h in honest} <= held
    assert 0 < len(held & {f.public_key for f in fakes}) < 10 and taken == 40
    assert sum(len(r) for r in storage.records(DKEY, now=now)) <= storage.value_budget
    assert set(storage.sources(DKEY, now=now).values()) == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.9.9.9"}


def test_servers_that_answer_outrank_identities_never_seen():
    """Even from the address holding the most, vouched-for servers stay while fakes from many addresses go first."""
    honest = [Identity.generate() for _ in range(4)]
    live = {h.public_key for h in honest}
    storage, now = PetalStorage(vouch=lambda pk, source: pk in live), time.time()
    for h in honest:  # four servers behind one address (a NAT): the heaviest source
        storage.merge(DKEY, full_size(h, issued_at=now - 30), now=now, source="10.0.0.1")
    for i in range(30):  # never-seen identities, each from its own address and fresher
        with contextlib.suppress(RecordError):
            storage.merge(DKEY, full_size(Identity.generate(), issued_at=now), now=now, source=f"10.9.9.{i}")
    held = {e.public_key for e in storage.entries(DKEY, now=now)}
    assert live <= held and len(held) > len(live)


def test_a_future_issued_at_buys_no_priority():
    """Dated 59 s ahead, a record counts as issued now: it ties with those issued now and, among equals, goes first."""
    now = time.time()
    first, ahead, last = Identity.generate(), Identity.generate(), Identity.generate()
    records = [full_size(first, issued_at=now), full_size(ahead, issued_at=now + 59), full_size(last, issued_at=now)]
    storage = PetalStorage(value_budget=sum(len(r) for r in records) - 1)
    for r in records:
        storage.merge(DKEY, r, now=now, source="10.0.0.1")
    assert {e.public_key for e in storage.entries(DKEY, now=now)} == {first.public_key, last.public_key}


def test_high_water_marks_of_throwaway_identities_are_bounded():
    storage, now = PetalStorage(value_budget=1000), time.time()
    for _ in range(MAX_SIGNERS_REMEMBERED + 100):
        with contextlib.suppress(RecordError):
            storage.merge(DKEY, record(Identity.generate(), issued_at=now), now=now, source="10.9.9.9")
    assert len(storage._high_water[DKEY]) <= MAX_SIGNERS_REMEMBERED
    assert all(pk in storage._high_water[DKEY] for pk in storage.sources(DKEY, now=now))


def test_source_of_groups_ipv6_by_64():
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"


async def wait_for(predicate, what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_storing_nodes_are_pinged_and_vouched_for_spoofed_node_ids_are_not():
    async with swarm(2) as (a, b):
        await a.announce(KEY, value(a.identity), ttl=60)
        await wait_for(lambda: b.protocol.vouches(a.identity.public_key, "127.0.0.1"), "b vouches for a")
        assert b.storage.sources(DKEY)[a.identity.public_key] == "127.0.0.1"
        assert a.storage.sources(DKEY)[a.identity.public_key] == "local"
        # a store claiming the node id of a throwaway identity: b pings that address, a answers with its own id
        fake = Identity.generate()
        spoofed = hashlib.sha1(fake.public_key).digest()
        ok, taken = await a.protocol._call(("127.0.0.1", b.port), "store", spoofed, DKEY, [record(fake)])
        assert ok and taken == 1
        await wait_for(lambda: b.protocol.is_unresponsive(spoofed), "b's ping of the spoofed id concluded")
        assert not b.protocol.vouches(fake.public_key, "127.0.0.1")
        assert spoofed not in {n.id for bucket in b.protocol.router.buckets for n in bucket.get_nodes()}
        assert b.protocol.vouches(a.identity.public_key, "127.0.0.1")


def replication_setup() -> tuple[str, Identity, Identity, Identity]:
    """A key and three identities such that the relay is closest to the key, the newcomer next and alice farthest:
    kademlia then has the relay (and only it) hand the newcomer the key when the newcomer joins. Not every three
    ids allow that order for some key (XOR distance is a tree), hence new ids until one does."""
    while True:
        relay, alice, newcomer = Identity.generate(), Identity.generate(), Identity.generate()
        r, a, n = (int.from_bytes(i.dht_node_id, "big") for i in (relay, alice, newcomer))
        for block in range(64):
            key = block_key("HuggingFaceTB/SmolLM2-135M", block)
            k = int.from_bytes(key_digest(key), "big")
            if r ^ k < n ^ k < a ^ k:
                return key, relay, alice, newcomer


async def test_replicated_entries_are_charged_to_the_relay_until_their_signer_stores_them():
    """kademlia hands a newcomer the keys it should hold; we charge those records to the node that relayed them."""
    key, relay_id, alice_id, newcomer_id = replication_setup()
    relay = DHT(relay_id, host="127.0.0.3")
    alice, newcomer = DHT(alice_id), DHT(newcomer_id)
    try:
        await relay.start()
        await alice.start([("127.0.0.3", relay.port)])
        await alice.announce(key, value(alice_id), ttl=60)
        assert relay.storage.sources(key_digest(key)) == {alice_id.public_key: "127.0.0.1"}
        await newcomer.start([("127.0.0.3", relay.port)])
        await wait_for(lambda: newcomer.storage.entries(key_digest(key)), "the relay's replication")
        assert newcomer.storage.sources(key_digest(key)) == {alice_id.public_key: "127.0.0.3"}
        await alice.announce(key, value(alice_id, throughput=5.0), ttl=60)  # alice's periodic re-announce
        assert newcomer.storage.sources(key_digest(key)) == {alice_id.public_key: "127.0.0.1"}
    finally:
        for node in (newcomer, alice, relay):
            await node.stop()
