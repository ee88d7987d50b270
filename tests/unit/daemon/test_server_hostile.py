"""A hostile battery against a real BlockServer (issue #16, findings 5, 7, 9, 10): ~1,000 seeded malformed frames on
every block protocol get error frames of the caller's codes (never "internal"), no handler crashes, and the server
still serves a good request afterwards; a session no budget could hold is "too_large" (the caller's fault) while a
full pool is "busy"; one peer idling on the whole cache cannot keep another out; a client's `push_to` never makes
the server dial an address the client chose.

The server runs in this process on MemoryTransport (the battery's subject is the server's parsing and error mapping,
not the transport, whose frame decoding has its own property tests); the push test uses the real libp2p transport
and a TCP socket the test listens on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.identity import Identity
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import MemoryNetwork, MemoryTransport, PeerAddr, StreamClosed, TransportError
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.kv_pool import KVPool
from petal.daemon.serving.settings import ServeSettings
from petal.kernels.store import load_span, open_model
from petal.protocol.errors import PetalError
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
)
from petal.protocol.records import block_key
from petal.protocol.replies import StepReply
from petal.protocol.tensors import encode_tensor
from tests.support.blocks import HIDDEN, tiny_llama

FRAMES = 1000
CALLER_CODES = {"bad_frame", "bad_tensor", "too_large", "bad_request", "unknown_block", "wrong_shape", "max_length"}
"""Codes that say "your request is wrong"; "busy"/"timeout"/"not_found" may come too, "internal" never."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(out)
    return out


async def start_server(model_dir: Path, transport, settings: ServeSettings, span=(0, 10), dht=None) -> BlockServer:
    info = open_model(model_dir)
    server = BlockServer(
        load_span(info, *span),
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=info.num_blocks,
        transport=transport,
        settings=settings,
        throughput=1.0,
        dht=dht,
    )
    await server.start()
    return server


@pytest.fixture
async def served(model_dir: Path):
    network = MemoryNetwork()
    server_t, client_t = MemoryTransport(network, "server"), MemoryTransport(network, "client")
    await server_t.start()
    await client_t.start()
    settings = ServeSettings(
        max_batch=4, max_length=64, max_cache_tokens=10 * 4 * 64, alloc_timeout=0.2, request_timeout=20
    )
    server = await start_server(model_dir, server_t, settings)
    yield server, client_t, network
    await server.stop()
    await client_t.stop()
    await server_t.stop()


# --- the generator of hostile frames -------------------------------------------------------------------------------

BIG = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -1, 0]
JUNK: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    1,
    *BIG,
    1.5,
    -0.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e308,
    "",
    "x",
    "x" * 300,
    "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    b"",
    b"\x00" * 7,
    [],
    [[]],
    [0, 9223372036854775808],
    [1, 2, 3],
    {},
    {"a": {"b": {"c": {"d": [1, {"e": None}]}}}},
    {"dtype": "float32"},
    list(range(40)),
]
SHAPES: list[Any] = [
    [0, 9223372036854775808],
    [0, 2**64 - 1, HIDDEN],
    [2**63 - 1],
    [2**31, 2**31, 2**31],
    [1, 2**40, HIDDEN],
    [0, 0, HIDDEN],
    [1, 0, HIDDEN],
    [0, 3, HIDDEN],
    [-1, 2, HIDDEN],
    [1, 2, -HIDDEN],
    [],
    [0],
    [1] * 17,
    [1.5, 2, HIDDEN],
    ["1", 2, HIDDEN],
    [True, 2, HIDDEN],
    [1, 2, HIDDEN],
    [1, 2, HIDDEN + 1],
    [5, 2, HIDDEN],
    [1, 65, HIDDEN],
    [10, 1, 1, HIDDEN],
    None,
    "1,2,64",
    {"0": 1},
]
DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8", "float64", "complex64", "", 3, None]
CODECS = ["none", "float16", "bfloat16", "q8", "zip", "", None, 7]


def good_tensor(rng: random.Random, batch: int = 1, tokens: int = 2, codec: str = "none") -> dict[str, Any]:
    return encode_tensor(torch.randn(batch, tokens, HIDDEN), codec)


def fitting_data(shape: Any, t: dict[str, Any]) -> Any:
    """Bytes of the size a shape (of ints) needs under codec none (empty for a zero-size shape), if small."""
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        return t.get("data")
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return b""
    t["codec"] = "none"
    t.pop("absmax", None)
    t.pop("block", None)
    size = {"float32": 4, "int64": 8, "int32": 4, "float16": 2, "bfloat16": 2}.get(str(t.get("dtype")), 1)
    return b"\x00" * (numel * size) if 0 < numel * size <= 1 << 20 else t.get("data")


def junk_tensor(rng: random.Random) -> Any:
    """A tensor dict with one to three fields wrong, or not a tensor at all."""
    kind = rng.random()
    if kind < 0.1:
        return rng.choice(JUNK)
    t: dict[str, Any] = dict(good_tensor(rng, rng.choice([1, 2]), rng.choice([1, 2, 3]), rng.choice(["none", "q8"])))
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(["dtype", "shape", "codec", "data", "absmax", "block", "drop", "extra", "nan", "values"])
        if field == "dtype":
            t["dtype"] = rng.choice(DTYPES)
        elif field == "shape":
            t["shape"] = shape = rng.choice(SHAPES)
            if rng.random() < 0.6:  # make the data fit the hostile shape, so that only the shape is wrong
                t["data"] = fitting_data(shape, t)
        elif field == "codec":
            t["codec"] = rng.choice(CODECS)
        elif field == "data":
            t["data"] = rng.choice([b"", b"\x00" * rng.randint(1, 4096), "text", None, 0, [1, 2]])
        elif field == "absmax":
            t["absmax"] = rng.choice([b"", b"\xff" * 4, b"\x00\x00\xc0\x7f" * 8, None, 1.0])
        elif field == "block":
            t["block"] = rng.choice([0, -1, 1, 2**63, 2**64 - 1, 1.5, None, "64"])
        elif field == "drop" and t:
            del t[rng.choice(sorted(t))]
        elif field == "extra":
            t[rng.choice(["x", "dtype2", ""])] = rng.choice(JUNK)
        elif field == "nan":
            return encode_tensor(torch.full((1, 2, HIDDEN), rng.choice([float("nan"), float("inf")])))
        else:  # well-formed but of an unexpected dtype
            return encode_tensor(torch.zeros(1, 2, HIDDEN, dtype=rng.choice([torch.int64, torch.bool, torch.uint8])))
    return t


def mutate(rng: random.Random, msg: dict[str, Any], tensors: tuple[str, ...]) -> Any:
    """`msg` with one to three fields broken (a field's value replaced, removed, a junk field or tensor added)."""
    if rng.random() < 0.05:
        return rng.choice(JUNK)
    msg = dict(msg)
    if tensors and rng.random() < 0.2:  # one defect only: a tensor whose shape alone is hostile
        t = dict(good_tensor(rng))
        t["shape"] = shape = rng.choice(SHAPES)
        t["data"] = fitting_data(shape, t)
        msg[rng.choice(tensors)] = t
        return msg
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.35 and tensors:
            msg[rng.choice(tensors)] = junk_tensor(rng)
        elif r < 0.75 and msg:
            msg[rng.choice(sorted(msg))] = rng.choice([*JUNK, rng.choice(SHAPES)])
        elif r < 0.85 and msg:
            del msg[rng.choice(sorted(msg))]
        else:
            msg[rng.choice(["lora", "prompts", "mask", "grad", "push_to", "position", "zzz"])] = rng.choice(
                [*JUNK, junk_tensor(rng)]
            )
    return msg


class Tally:
    """Counts of frames sent and the codes they got."""

    def __init__(self) -> None:
        self.frames = 0
        self.codes: Counter[str] = Counter()
        self.internal: list[tuple[str, Any, str]] = []

    def reply(self, protocol: str, frame: Any, reply: Any) -> None:
        self.frames += 1
        if isinstance(reply, dict) and "error" in reply:
            error = PetalError.from_wire(reply["error"])
            self.codes[error.code] += 1
            if error.code == "internal":
                self.internal.append((protocol, repr(frame)[:300], error.message))
        else:
            self.codes["ok"] += 1

    def dropped(self) -> None:
        """The frame could not be sent or its stream was reset (a transport-level refusal, not a reply)."""
        self.frames += 1
        self.codes["(stream reset)"] += 1


async def call(client_t, protocol: str, frame: Any) -> Any:
    return await client_t.call(PeerAddr("server"), protocol, frame, timeout=30)


async def test_hostile_frames_never_get_internal_and_the_server_goes_on(served, caplog) -> None:
    server, client_t, _ = served
    await battery(server, client_t, PeerAddr("server"), FRAMES, caplog)


async def test_hostile_frames_over_libp2p(model_dir: Path, caplog) -> None:
    """A smaller battery over the real transport (noise, yamux, its frame decoder): the same outcome."""
    server_t, client_t = Libp2pTransport(Identity.generate()), Libp2pTransport(Identity.generate())
    await server_t.start()
    await client_t.start()
    settings = ServeSettings(max_batch=4, max_length=64, max_cache_tokens=10 * 4 * 64, alloc_timeout=0.2)
    server = await start_server(model_dir, server_t, settings)
    try:
        await battery(server, client_t, PeerAddr(server_t.peer_id, tuple(server_t.listen_addrs)), 200, caplog)
    finally:
        await server.stop()
        await client_t.stop()
        await server_t.stop()


async def battery(server: BlockServer, client_t, peer: PeerAddr, frames: int, caplog) -> None:
    """`frames` seeded hostile frames on every block protocol of `server`; asserts none got "internal", no handler
    crashed, and the server still serves a good request afterwards."""
    caplog.set_level(logging.INFO)
    rng = random.Random(16)
    tally = Tally()
    header = {"model": server.model, "fingerprint": server.fingerprint, "start": 0, "end": 10}
    forward = {**header, "hidden": good_tensor(rng), "codec": "none"}
    backward = {**forward, "grad": good_tensor(rng)}
    opening = {**header, "max_length": 8, "batch": 1, "codec": "none", "push": True}

    async def one_call(protocol: str, frame: Any) -> None:
        try:
            tally.reply(protocol, frame, await client_t.call(peer, protocol, frame, timeout=30))
        except (TransportError, PetalError):
            tally.dropped()

    per = frames // 5  # info 10%, forward 20%, backward 20%, inference opens 10%, steps 25%, pushes 15%
    for _ in range(per // 2):
        await one_call(INFO_PROTOCOL, mutate(rng, {"model": server.model}, ()))
    for _ in range(per):
        await one_call(FORWARD_PROTOCOL, mutate(rng, forward, ("hidden", "mask", "prompts")))
    for _ in range(per):
        await one_call(BACKWARD_PROTOCOL, mutate(rng, backward, ("hidden", "grad", "prompts")))
    for _ in range(per // 2):  # hostile first messages of inference streams
        stream = await client_t.open_stream(peer, INFERENCE_PROTOCOL)
        frame = mutate(rng, opening, ())
        try:
            await stream.send(frame)
            tally.reply(INFERENCE_PROTOCOL, frame, await stream.recv(timeout=30))
        except (TransportError, PetalError):
            tally.dropped()
        await stream.close()

    # hostile steps on open sessions (a fresh session whenever the server ended one), and hostile pushes into them
    session_stream = None
    session_id = ""
    step = {"hidden": good_tensor(rng, tokens=1), "step": 0}

    async def reopen() -> None:
        nonlocal session_stream, session_id
        if session_stream is not None:
            await session_stream.close()
        session_stream = await client_t.open_stream(peer, INFERENCE_PROTOCOL)
        await session_stream.send(opening)
        opened = await session_stream.recv(timeout=30)
        assert opened.get("ok") is True, opened
        session_id = opened["session"]

    await reopen()
    for i in range(per + per // 4):
        assert session_stream is not None
        frame = mutate(rng, {**step, "step": i, "position": rng.choice([0, 1, 7, None])}, ("hidden", "mask", "prompts"))
        if isinstance(frame, dict) and rng.random() < 0.2:
            frame["push_to"] = rng.choice(
                [{"peer": "server", "session": session_id}, {"peer": "nobody", "addrs": ["/ip4/127.0.0.1/tcp/9"]}, 7]
            )
        try:
            await session_stream.send(frame)
            tally.reply(INFERENCE_PROTOCOL, frame, await session_stream.recv(timeout=30))
        except (TransportError, PetalError):
            tally.dropped()
            await reopen()
    push = await client_t.open_stream(peer, PUSH_PROTOCOL)
    for i in range(per - per // 4):
        frame = mutate(
            rng, {"session": session_id, "step": 1000 + i, "hidden": good_tensor(rng, tokens=1)}, ("hidden",)
        )
        try:
            await push.send(frame)
            tally.reply(PUSH_PROTOCOL, frame, await push.recv(timeout=30))
        except (TransportError, PetalError):
            tally.dropped()
            push = await client_t.open_stream(peer, PUSH_PROTOCOL)
    await push.close()
    assert session_stream is not None
    await session_stream.close()

    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    codes = dict(sorted(tally.codes.items()))
    print(f"\n{type(client_t).__name__}: hostile frames: {tally.frames}, replies by code: {codes}")
    print(f"internal errors: {len(tally.internal)}, handler crashes: {len(crashes)}")
    assert tally.frames == frames
    assert not tally.internal, tally.internal[:5]
    assert not crashes, [r.getMessage() for r in crashes[:5]]
    assert set(tally.codes) - {"ok", "(stream reset)"} <= CALLER_CODES | {"busy", "not_found", "timeout"}

    # the server still serves everyone: info, a forward, a whole inference session; every cache went back
    remote = RemoteSpan(client_t, peer, server.model, server.fingerprint, 0, 10, "none")
    assert (await remote.info()).end == 10
    assert (await remote.forward(torch.randn(1, 3, HIDDEN))).shape == (1, 3, HIDDEN)
    async with await remote.open_inference(max_length=8, batch=1) as session:
        assert (await session.step(torch.randn(1, 2, HIDDEN))).shape == (1, 2, HIDDEN)
    for _ in range(200):
        if server.pool.free_units == server.pool.units:
            break
        await asyncio.sleep(0.02)
    assert server.pool.free_units == server.pool.units


async def test_zero_size_tensor_with_a_huge_dimension_is_the_callers_error(served) -> None:
    """Finding 5's reproduction: `shape: [0, 2**63]` on forward, backward, a step and a push."""
    server, client_t, _ = served
    header = {"model": server.model, "fingerprint": server.fingerprint, "start": 0, "end": 10}
    hostile = {"dtype": "float32", "shape": [0, 9223372036854775808], "codec": "none", "data": b""}
    codes = [
        (await call(client_t, FORWARD_PROTOCOL, {**header, "hidden": hostile}))["error"]["code"],
        (await call(client_t, BACKWARD_PROTOCOL, {**header, "hidden": hostile, "grad": hostile}))["error"]["code"],
    ]
    stream = await client_t.open_stream(PeerAddr("server"), INFERENCE_PROTOCOL)
    await stream.send({**header, "max_length": 8, "batch": 1, "push": True})
    session = (await stream.recv(timeout=10))["session"]
    await stream.send({"hidden": hostile})
    codes.append((await stream.recv(timeout=10))["error"]["code"])
    push = await client_t.open_stream(PeerAddr("server"), PUSH_PROTOCOL)
    await push.send({"session": session, "step": 0, "hidden": hostile})
    codes.append((await push.recv(timeout=10))["error"]["code"])
    await stream.send({"hidden": good_tensor(random.Random(0))})  # the session still works
    assert StepReply.from_wire(await stream.recv(timeout=10)).position == 2
    for s in (push, stream):
        await s.close()
    assert all(code in CALLER_CODES for code in codes), codes


# --- finding 7: the caller's mistake vs the server's state ---------------------------------------------------------


async def test_a_session_beyond_the_whole_budget_is_too_large_and_a_full_pool_is_busy(served, model_dir) -> None:
    server, client_t, _ = served
    remote = RemoteSpan(client_t, PeerAddr("server"), server.model, server.fingerprint, 0, 10, "none")
    info = await remote.info()
    assert (info.max_length, info.max_batch, info.cache_tokens_left) == (64, 4, 4 * 64)  # the limits, announced
    with pytest.raises(PetalError) as e:
        await remote.open_inference(max_length=64, batch=4 + 1)  # over max_batch: the caller's
    assert e.value.code == "wrong_shape"
    small = ServeSettings(max_batch=8, max_length=64, max_cache_tokens=10 * 64, alloc_timeout=0.1)
    network = MemoryNetwork()
    s_t, c_t = MemoryTransport(network, "server"), MemoryTransport(network, "c")
    await s_t.start()
    await c_t.start()
    tight = await start_server(model_dir, s_t, small)
    try:
        r = RemoteSpan(c_t, PeerAddr("server"), tight.model, tight.fingerprint, 0, 10, "none")
        with pytest.raises(PetalError) as e:  # 10 blocks x batch 2 x 64 > 640: never fits here
            await r.open_inference(max_length=64, batch=2)
        assert e.value.code == "too_large" and "640" in e.value.message and "max_length" in e.value.message
        held = await r.open_inference(max_length=64, batch=1)  # everything, right now
        with pytest.raises(PetalError) as e:
            await r.open_inference(max_length=8, batch=1)
        assert e.value.code == "busy"  # full now, not forever
        await held.close()
    finally:
        await tight.stop()
        await c_t.stop()
        await s_t.stop()


# --- finding 9: one peer cannot hold the whole cache ---------------------------------------------------------------


async def test_an_idle_peer_holding_the_whole_cache_cannot_keep_others_out(model_dir: Path) -> None:
    network = MemoryNetwork()
    server_t = MemoryTransport(network, "server")
    a_t, b_t = MemoryTransport(network, "peer-a"), MemoryTransport(network, "peer-b")
    for t in (server_t, a_t, b_t):
        await t.start()
    settings = ServeSettings(
        max_batch=4, max_length=64, max_cache_tokens=10 * 2 * 64, alloc_timeout=30, contended_idle_timeout=0.2
    )
    server = await start_server(model_dir, server_t, settings)
    try:
        a = RemoteSpan(a_t, PeerAddr("server"), server.model, server.fingerprint, 0, 10, "none")
        b = RemoteSpan(b_t, PeerAddr("server"), server.model, server.fingerprint, 0, 10, "none")
        hog = [await a.open_inference(max_length=64, batch=1), await a.open_inference(max_length=64, batch=1)]
        await hog[0].step(torch.randn(1, 1, HIDDEN))
        assert server.pool.free_units == 0  # peer A holds everything, alone on the server: allowed
        # peer B waits (up to alloc_timeout = 30 s); A's idle sessions are closed after the 0.2 s grace
        session = await asyncio.wait_for(b.open_inference(max_length=64, batch=1), timeout=20)
        assert (await session.step(torch.randn(1, 3, HIDDEN))).shape == (1, 3, HIDDEN)
        # the evicted session of A learns why at its next step
        errors = []
        for s in hog:
            try:
                await s.step(torch.randn(1, 1, HIDDEN))
            except (PetalError, TransportError, StreamClosed) as e:
                errors.append(e)
        assert errors and any("wait for this server's KV cache" in str(e) for e in errors), errors
        await session.close()
        for s in hog:
            await s.close()
    finally:
        await server.stop()
        for t in (a_t, b_t, server_t):
            await t.stop()


async def test_a_peer_gets_at_most_its_share_of_a_contended_pool() -> None:
    pool = KVPool(1000, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu", peer_share=0.5)
    alone = pool.try_allocate(1, 1, 900, owner="a")  # nobody else around: a peer may take (almost) everything
    assert alone is not None
    pool.free(alone)
    a1 = pool.try_allocate(1, 1, 400, owner="a")
    b1 = pool.try_allocate(1, 1, 100, owner="b")
    assert a1 is not None and b1 is not None
    assert pool.try_allocate(1, 1, 200, owner="a") is None  # a would hold 600 > 500 while b uses the server
    a2 = pool.try_allocate(1, 1, 100, owner="a")
    assert a2 is not None and pool.held("a") == 500
    assert pool.try_allocate(1, 1, 300, owner="b") is not None  # b may still grow to its share
    with pytest.raises(PetalError) as e:
        await pool.allocate(1, 1, 50, timeout=0.05, owner="a")
    assert e.value.code == "busy" and "share" in e.value.message
    with pytest.raises(PetalError) as e:  # never fits: the caller's mistake, at once
        await pool.allocate(2, 1, 501, timeout=10, owner="c")
    assert e.value.code == "too_large" and "whole KV budget of 1000" in e.value.message


# --- finding 10: push goes only to announced servers ---------------------------------------------------------------


async def test_push_to_never_dials_a_client_supplied_address(model_dir: Path) -> None:
    """Real libp2p transports: a step whose push_to names an arbitrary peer (or a peer that is no server) with a local
    port the test listens on: the server does not connect there, answers `pushed: false`, and the session goes on;
    a push to the server the DHT announces after this hop works, whatever addresses the client wrote."""
    swarm = MemorySwarm()
    ids = {name: Identity.generate() for name in ("server", "next", "client")}
    transports = {name: Libp2pTransport(identity) for name, identity in ids.items()}
    for t in transports.values():
        await t.start()
    dhts = {name: MemoryDHT(identity, swarm) for name, identity in ids.items()}
    for d in dhts.values():
        await d.start()
    settings = ServeSettings(max_batch=2, max_length=16, max_cache_tokens=10 * 16)
    first = await start_server(model_dir, transports["server"], settings, span=(0, 5), dht=dhts["server"])
    second = await start_server(model_dir, transports["next"], settings, span=(5, 10), dht=dhts["next"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    client_t = transports["client"]
    try:
        # the next hop announces itself as a node's announcer would
        await dhts["next"].announce(block_key(second.model, 5), second.record("online"), ttl=60)
        header = {"model": first.model, "fingerprint": first.fingerprint}
        to_next = PeerAddr(ids["next"].peer_id, tuple(transports["next"].listen_addrs))
        downstream = await client_t.open_stream(to_next, INFERENCE_PROTOCOL)
        await downstream.send({**header, "start": 5, "end": 10, "max_length": 8, "batch": 1, "push": True})
        target_session = (await downstream.recv(timeout=10))["session"]
        to_first = PeerAddr(ids["server"].peer_id, tuple(transports["server"].listen_addrs))
        upstream = await client_t.open_stream(to_first, INFERENCE_PROTOCOL)
        await upstream.send({**header, "start": 0, "end": 5, "max_length": 8, "batch": 1})
        assert (await upstream.recv(timeout=10))["ok"] is True
        x = encode_tensor(torch.randn(1, 1, HIDDEN))
        hostile_addrs = [f"/ip4/127.0.0.1/tcp/{port}"]
        hostile_targets = [
            {"peer": Identity.generate().peer_id, "addrs": hostile_addrs, "session": "ab" * 16},  # anyone at all
            {"peer": ids["client"].peer_id, "addrs": hostile_addrs, "session": "ab" * 16},  # a peer, but no server
        ]
        for i, target in enumerate(hostile_targets):
            await upstream.send({"hidden": x, "step": i, "push_to": target})
            reply = StepReply.from_wire(await upstream.recv(timeout=30))
            assert reply.pushed is False and reply.hidden is not None
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected to the address the client named
        target = {"peer": ids["next"].peer_id, "addrs": hostile_addrs, "session": target_session}
        await upstream.send({"hidden": x, "step": 2, "push_to": target})
        assert StepReply.from_wire(await upstream.recv(timeout=30)).pushed is True
        await downstream.send({"step": 2, "tokens": 1, "push_from": ids["server"].peer_id})
        assert StepReply.from_wire(await downstream.recv(timeout=30)).hidden is not None
        with pytest.raises(BlockingIOError):
            listener.accept()
        await upstream.close()
        await downstream.close()
    finally:
        listener.close()
        await first.stop()
        await second.stop()
        for d in dhts.values():
            await d.stop()
        for t in transports.values():
            await t.stop()
