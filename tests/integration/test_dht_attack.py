"""Issue #16 finding 13: an attacker with many identities cannot make a served model undiscoverable.

Real DHT nodes over loopback UDP: honest nodes and servers on 127.0.0.1, the attacker on 127.0.0.2 (a different
source address, as a machine elsewhere would be). Identities are free, so the attacker signs as many as it likes,
fills each record to the size limit and dates it as far in the future as nodes accept. Before the fix, one store of
ten such records per node evicted every honest entry under ``_models`` and the servers' re-announces were refused
("key is full of fresher entries"), so every generation failed with 404 "no server announces model".
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from petal.daemon.dht.network import DHT
from petal.daemon.identity import Identity
from petal.daemon.routing.swarm import SwarmView
from petal.kernels.store import open_model
from petal.protocol.records import (
    MAX_CLOCK_SKEW,
    MAX_RECORD_BYTES,
    MAX_TTL,
    MODELS_KEY,
    ModelRecord,
    RecordError,
    ServerRecord,
    block_key,
    key_digest,
    sign_entry,
)
from tests.support.blocks import tiny_llama
from tests.support.daemons import Daemon, Swarm, wait_for_route

pytestmark = pytest.mark.timeout(300)

MODEL = "HuggingFaceTB/SmolLM2-135M"
FINGERPRINT = "sha256:" + "ab" * 32
NUM_BLOCKS = 2
BLOCK_KEYS = [block_key(MODEL, b) for b in range(NUM_BLOCKS)]
HONEST_NODES = 6  # plain DHT nodes (what clients' daemons run)
SERVERS = 3  # nodes that also announce the model and its blocks
FAKES = 40  # attacker identities
ATTACKER = "127.0.0.2"
RECORDS_PER_STORE = 10  # ten records of ~640 bytes fit one datagram


def model_value() -> dict:
    return ModelRecord(MODEL, FINGERPRINT, NUM_BLOCKS, "llama").to_value()


def server_value(identity: Identity) -> dict:
    addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}"
    return ServerRecord(
        (addr,), 0, NUM_BLOCKS, "online", 100.0, 4096, "bfloat16", 1, fingerprint=FINGERPRINT
    ).to_value()


def pad_to_limit(identity: Identity, key: str, value: dict) -> dict:
    """``value`` with a padding field that brings its signed record to just under the size limit."""
    value = dict(value, x="")
    now = time.time()
    while True:
        value["x"] += "A" * 8
        try:
            sign_entry(identity, key, value, issued_at=now, expires_at=now + MAX_TTL)
        except RecordError:
            value["x"] = value["x"][:-8]
            return value


def padded(identity: Identity, key: str, value: dict, issued_at: float) -> bytes:
    """``value`` signed under ``key``, padded to just under the record size limit, valid for MAX_TTL."""
    value = pad_to_limit(identity, key, value)
    record = sign_entry(identity, key, value, issued_at=issued_at, expires_at=issued_at + MAX_TTL).to_record()
    assert len(record) > MAX_RECORD_BYTES - 8
    return record


def fake_records(fakes: list[Identity], key: str) -> list[bytes]:
    """What the attacker stores: full-size records from the near future (as far ahead as nodes accept)."""
    future = time.time() + MAX_CLOCK_SKEW - 2
    if key == MODELS_KEY:
        values = [
            ModelRecord(f"fake/model-{i}", "sha256:" + "00" * 32, 1, "llama").to_value() for i in range(len(fakes))
        ]
    else:
        values = [server_value(f) for f in fakes]
    return [padded(f, key, v, future) for f, v in zip(fakes, values, strict=True)]


async def flood(attacker: DHT, targets: list[DHT], key: str, records: list[bytes]) -> int:
    """Store ``records`` on every target by raw store RPCs from the attacker's address. Returns how many were taken."""
    taken = 0
    for target in targets:
        for i in range(0, len(records), RECORDS_PER_STORE):
            chunk = records[i : i + RECORDS_PER_STORE]
            ok, n = await attacker.protocol._call(
                (target.host, target.port), "store", attacker.node_id, key_digest(key), chunk
            )
            assert ok, "the attacker's store got no reply"
            taken += n if isinstance(n, int) else 0
    return taken


@contextlib.asynccontextmanager
async def honest_swarm() -> AsyncIterator[list[DHT]]:
    nodes = [DHT(Identity.generate(), rpc_timeout=0.5) for _ in range(HONEST_NODES)]
    try:
        await nodes[0].start()
        for node in nodes[1:]:
            await node.start([("127.0.0.1", nodes[0].port)])
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def announce_all(servers: list[DHT]) -> list[int]:
    """Each server announces the model and every block, as a block server's publish does. Returns nodes reached."""
    reached = []
    for server in servers:
        reached.append(await server.announce(MODELS_KEY, model_value(), ttl=120))
        for key in BLOCK_KEYS:
            reached.append(await server.announce(key, server_value(server.identity), ttl=120))
    return reached


def honest_held(nodes: list[DHT], servers: list[DHT], key: str) -> int:
    """How many honest (node, server) entries under ``key`` the honest nodes hold in their stores."""
    honest = {s.identity.public_key for s in servers}
    return sum(len(honest & {e.public_key for e in n.storage.entries(key_digest(key))}) for n in nodes)


async def assert_discoverable(client: DHT, servers: list[DHT]) -> None:
    """What a generation does first: read the model and its servers. Must not fail with 'no server announces'."""
    honest = {s.identity.peer_id for s in servers}
    for key in [MODELS_KEY, *BLOCK_KEYS]:
        assert honest <= {e.peer_id for e in await client.get(key)}, key
    view = SwarmView(client, MODEL)
    await view.refresh()
    assert view.fingerprint == FINGERPRINT and view.num_blocks == NUM_BLOCKS
    assert honest <= set(view.servers)  # fake servers may be listed too: routing probes and bans those


async def test_fake_identities_from_one_address_cannot_evict_servers() -> None:
    """The attack that was found: a raw store flood of fake identities, before and after the servers re-announce."""
    async with honest_swarm() as nodes:
        servers, client = nodes[:SERVERS], nodes[-1]
        assert all(r == HONEST_NODES for r in await announce_all(servers))
        await assert_discoverable(client, servers)
        before = {key: honest_held(nodes, servers, key) for key in [MODELS_KEY, *BLOCK_KEYS]}
        assert before == dict.fromkeys(before, HONEST_NODES * SERVERS)

        attacker = DHT(Identity.generate(), host=ATTACKER, rpc_timeout=0.5)
        try:
            await attacker.start([("127.0.0.1", nodes[0].port)])
            fakes = [Identity.generate() for _ in range(FAKES)]
            stored = {}
            for key in [MODELS_KEY, BLOCK_KEYS[0]]:
                records = fake_records(fakes, key)
                stored[key] = (await flood(attacker, nodes, key, records), len(records[0]))
            after = {key: honest_held(nodes, servers, key) for key in [MODELS_KEY, *BLOCK_KEYS]}
            fake_keys = {f.public_key for f in fakes}
            fake_held = sum(
                len(fake_keys & {e.public_key for e in n.storage.entries(key_digest(MODELS_KEY))}) for n in nodes
            )
            print(
                f"\n{FAKES} fake identities from {ATTACKER}, {len(nodes)} honest nodes, {SERVERS} servers; "
                f"fake records taken (count, bytes each): {stored}; fake entries held under _models afterwards: "
                f"{fake_held}; honest entries held before: {before}, after the flood: {after}"
            )
            assert after == before, "the flood evicted honest entries"
            await assert_discoverable(client, servers)

            reached = await announce_all(servers)  # the servers' periodic re-announce
            print(f"re-announces reached {reached} nodes (of {len(nodes) + 1}, the attacker's node included)")
            assert all(r >= HONEST_NODES for r in reached), "a re-announce was refused"
            await assert_discoverable(client, servers)
            # a second round of the flood, now that the honest entries are the freshest: still nothing evicted
            for key in [MODELS_KEY, BLOCK_KEYS[0]]:
                await flood(attacker, nodes, key, fake_records([Identity.generate() for _ in range(FAKES)], key))
            assert {key: honest_held(nodes, servers, key) for key in before} == before
            await assert_discoverable(client, servers)
        finally:
            await attacker.stop()


async def test_many_answering_attacker_nodes_on_one_address_cannot_evict_servers() -> None:
    """The costlier attack: every attacker identity runs a real DHT node that answers RPCs, all on one address."""
    async with honest_swarm() as nodes:
        servers, client = nodes[:SERVERS], nodes[-1]
        await announce_all(servers)
        before = {key: honest_held(nodes, servers, key) for key in [MODELS_KEY, *BLOCK_KEYS]}
        sybils = [DHT(Identity.generate(), host=ATTACKER, rpc_timeout=0.5) for _ in range(24)]
        try:
            for sybil in sybils:
                await sybil.start([("127.0.0.1", nodes[0].port)])
            for i, sybil in enumerate(sybils):
                fake_model = ModelRecord(f"fake/m{i}", "sha256:0", 1, "llama").to_value()
                await sybil.announce(MODELS_KEY, pad_to_limit(sybil.identity, MODELS_KEY, fake_model), ttl=MAX_TTL)
                fake_server = server_value(sybil.identity)
                await sybil.announce(
                    BLOCK_KEYS[0], pad_to_limit(sybil.identity, BLOCK_KEYS[0], fake_server), ttl=MAX_TTL
                )
            after = {key: honest_held(nodes, servers, key) for key in before}
            print(
                f"\n{len(sybils)} answering attacker nodes on {ATTACKER}: honest entries before {before}, after {after}"
            )
            assert after == before
            await assert_discoverable(client, servers)
            assert all(r >= 1 for r in await announce_all(servers))
            await assert_discoverable(client, servers)
        finally:
            for sybil in sybils:
                await sybil.stop()


# -- the same attack on real petald processes: the flood hits the daemons' DHT ports, clients read through their API --

DAEMON_TTL = 6.0  # servers re-announce every 2 s, so the test can watch a re-announce land


def dht_entries(daemon: Daemon, key: str) -> dict[str, dict]:
    """Entries under ``key`` as ``daemon`` reads them from the network (GET /v1/dht/{key})."""
    return {e["peer_id"]: e for e in daemon.client.get(f"/v1/dht/{quote(key, safe='')}")["entries"]}


async def flood_daemons(daemons: list[Daemon], model: str) -> dict[str, int]:
    """40 fake identities from 127.0.0.2 flood ``_models`` and the model's first block key on every daemon."""
    ports = [d.status()["dht_port"] for d in daemons]
    attacker = DHT(Identity.generate(), host=ATTACKER, rpc_timeout=0.5)
    await attacker.start([("127.0.0.1", ports[0])])
    try:
        fakes = [Identity.generate() for _ in range(FAKES)]
        taken = {}
        for key in [MODELS_KEY, block_key(model, 0)]:
            records = fake_records(fakes, key)
            taken[key] = 0
            for port in ports:
                for i in range(0, len(records), RECORDS_PER_STORE):
                    chunk = records[i : i + RECORDS_PER_STORE]
                    ok, n = await attacker.protocol._call(
                        ("127.0.0.1", port), "store", attacker.node_id, key_digest(key), chunk
                    )
                    assert ok, "a daemon did not answer the attacker's store"
                    taken[key] += n if isinstance(n, int) else 0
        return taken
    finally:
        await attacker.stop()


def test_real_daemons_keep_serving_a_model_through_a_flood() -> None:
    root = Path(tempfile.mkdtemp(prefix="petal-atk-", dir="/tmp"))  # short: AF_UNIX paths are limited
    model_dir = root / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    info = open_model(model_dir)
    (root / "fast.toml").write_text(f"announce_ttl = {DAEMON_TTL}\n")
    cfg = str(root / "fast.toml")
    swarm = Swarm(root)
    try:
        s0 = swarm.start_bootstrap("s0", "--config", cfg, "--serve", str(model_dir), "--blocks", "0:15")
        s1 = swarm.join("s1", s0, "--config", cfg, "--serve", str(model_dir), "--blocks", f"15:{info.num_blocks}")
        client = swarm.join("c", s0, "--config", cfg)
        wait_for_route(client, info.name, info.num_blocks)
        servers = {s.status()["peer_id"] for s in (s0, s1)}
        first = block_key(info.name, 0)
        before = dht_entries(client, MODELS_KEY)
        assert servers <= set(before)

        taken = asyncio.run(flood_daemons([s0, s1, client], info.name))
        models = dht_entries(client, MODELS_KEY)  # right after the flood
        print(f"\nfake records taken over 3 daemons: {taken}; _models now lists {len(models)} entries")
        assert servers <= set(models) and all(models[p]["state"] == "online" for p in servers)
        assert s0.status()["peer_id"] in dht_entries(client, first)
        late = swarm.join("late", s0, "--config", cfg)  # a client with no cached view: reads the model afresh
        assert wait_for_route(late, info.name, info.num_blocks)

        # the servers re-announce (every DAEMON_TTL / 3 s): their fresh entries are taken, and still readable
        issued = {p: models[p]["issued_at"] for p in servers}
        deadline = time.monotonic() + 10 * DAEMON_TTL
        while not all(dht_entries(client, MODELS_KEY).get(p, {}).get("issued_at", 0) > issued[p] for p in servers):
            assert time.monotonic() < deadline, "the servers' re-announces never became readable"
            time.sleep(0.25)
        asyncio.run(flood_daemons([s0, s1, client, late], info.name))
        assert servers <= set(dht_entries(late, MODELS_KEY))
        assert servers <= {r["peer_id"] for r in wait_for_route(late, info.name, info.num_blocks)}
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)
