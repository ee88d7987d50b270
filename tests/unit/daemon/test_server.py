"""Block server in one process over MemoryTransport: results equal plain transformers, bad input gets clear errors.

Reference: the full transformers model with `output_hidden_states`; `hidden_states[b]` is the input of block b, so
blocks [a, b) must map `hidden_states[a]` to `hidden_states[b]` (b < num_layers: the last entry has the final norm).
fp32 with codec "none" must match within ATOL (relative to max |ref|); codec "q8" within Q8_TOL
(reference model and tolerances: `tests.support.blocks`).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from petal.daemon.net.transport import MemoryNetwork, MemoryTransport, PeerAddr, StreamReset
from petal.daemon.routing.faults import is_server_fault
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.kv_pool import KVPool
from petal.daemon.serving.placement import choose_span
from petal.daemon.serving.settings import ServeSettings
from petal.daemon.serving.worker import ComputeWorker
from petal.kernels.store import load_span, open_model
from petal.protocol.errors import PetalError
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
)
from petal.protocol.records import ServerRecord
from petal.protocol.replies import (
    BackwardReply,
    ForwardReply,
    InfoReply,
    OpenReply,
    PushAck,
    StepReply,
    decode_reply_tensor,
)
from petal.protocol.tensors import encode_tensor
from tests.support.blocks import HIDDEN, LAYERS, Q8_TOL, close, hidden_states, tiny_llama

SERVED = (0, 10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(model_dir).eval()


async def eventually(condition, timeout: float = 10.0) -> None:
    """Wait for a condition that the server reaches asynchronously (e.g. freeing a cache after a close)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


@pytest.fixture
async def swarm(model_dir: Path):
    """A BlockServer for blocks [0, 10) on one MemoryTransport, a client transport, and a span factory."""
    info = open_model(model_dir)
    span = load_span(info, *SERVED)
    network = MemoryNetwork()
    server_t, client_t = MemoryTransport(network, "server"), MemoryTransport(network, "client")
    await server_t.start()
    await client_t.start()
    settings = ServeSettings(max_batch=4, max_length=64, max_cache_tokens=10 * 2 * 64, alloc_timeout=0.3)
    server = BlockServer(
        span,
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=info.num_blocks,
        transport=server_t,
        settings=settings,
        throughput=1.0,
    )
    await server.start()

    def remote(start: int = 0, end: int = 10, codec: str = "none") -> RemoteSpan:
        return RemoteSpan(client_t, PeerAddr("server"), info.name, info.fingerprint, start, end, codec)

    yield server, remote, client_t
    await server.stop()
    await client_t.stop()
    await server_t.stop()


async def test_info(swarm) -> None:
    _, remote, _ = swarm
    info = await remote().info()
    assert (info.start, info.end, info.hidden_size, info.num_blocks) == (0, 10, HIDDEN, LAYERS)
    assert info.cache_tokens_left == 2 * 64 and info.max_batch == 4 and "q8" in info.codecs


async def test_forward_matches_transformers(swarm, reference) -> None:
    _, remote, _ = swarm
    torch.manual_seed(1)
    embeds = torch.randn(2, 7, HIDDEN)
    hs = hidden_states(reference, embeds)
    assert close(await remote().forward(embeds), hs[10])
    assert close(await remote(3, 7).forward(hs[3]), hs[7])  # any sub-range of the served span
    assert close(await remote(codec="q8").forward(embeds), hs[10], Q8_TOL)


async def test_backward_matches_autograd(swarm, reference) -> None:
    _, remote, _ = swarm
    torch.manual_seed(2)
    embeds = torch.randn(2, 5, HIDDEN, requires_grad=True)
    grad_out = torch.randn(2, 5, HIDDEN)
    out = hidden_states(reference, embeds)[10]
    (expected,) = torch.autograd.grad(out, embeds, grad_out)
    got, grad_prompts, grad_lora = await remote().backward(embeds.detach(), grad_out)
    assert grad_prompts is None and grad_lora is None
    assert close(got, expected)


async def test_deep_prompts_forward_backward(swarm, reference) -> None:
    """hidden[:, :P] += prompts[i] before block i, and the gradient w.r.t. the prompts, as in Petals."""
    _, remote, _ = swarm
    torch.manual_seed(3)
    embeds = torch.randn(2, 6, HIDDEN)
    prompts = (0.5 * torch.randn(4, 2, 3, HIDDEN)).requires_grad_(True)
    layers = reference.model.layers

    def hook(index: int):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            p = prompts[index - 2]
            hidden = torch.cat([hidden[:, : p.shape[1]] + p, hidden[:, p.shape[1] :]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return pre

    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(2, 6)]
    try:
        x = embeds.clone().requires_grad_(True)
        hs = hidden_states(reference, x)
        expected = hs[6]
        grad_out = torch.randn_like(expected)
        exp_gx, exp_gp = torch.autograd.grad(expected, [x, prompts], grad_out)
    finally:
        for h in handles:
            h.remove()
    start = hidden_states(reference, embeds)[2]  # prompts start at block 2: its plain input is the chain's input
    got = await remote(2, 6).forward(start, prompts=prompts.detach())
    assert close(got, expected.detach())
    # the gradient w.r.t. block 2's input; chain it through blocks [0, 2) on the reference to compare with x.grad
    g_in, g_prompts, _ = await remote(2, 6).backward(start, grad_out, prompts=prompts.detach())
    assert g_prompts is not None and close(g_prompts, exp_gp)
    x2 = embeds.clone().requires_grad_(True)
    (g_x,) = torch.autograd.grad(hidden_states(reference, x2)[2], x2, g_in)
    assert close(g_x, exp_gx)


async def test_inference_steps_and_replay(swarm, reference) -> None:
    _, remote, _ = swarm
    torch.manual_seed(4)
    embeds = torch.randn(1, 9, HIDDEN)
    expected = hidden_states(reference, embeds)[10]
    async with await remote().open_inference(max_length=16, batch=1) as session:
        outs = [await session.step(embeds[:, :4])]  # prefill
        for i in range(4, 9):
            outs.append(await session.step(embeds[:, i : i + 1]))
        assert session.position == 9
        assert close(torch.cat(outs, dim=1), expected)
        # history replay: position 5 truncates the cache, then the same tokens give the same outputs
        again = await session.step(embeds[:, 5:9], position=5)
        assert session.position == 9
        assert close(again, expected[:, 5:9])


async def test_inference_q8(swarm, reference) -> None:
    _, remote, _ = swarm
    embeds = torch.randn(2, 5, HIDDEN)
    expected = hidden_states(reference, embeds)[10]
    async with await remote(codec="q8").open_inference(max_length=8, batch=2) as session:
        out = torch.cat([await session.step(embeds[:, :3]), await session.step(embeds[:, 3:])], dim=1)
    assert close(out, expected, Q8_TOL)


async def test_bad_requests_get_errors_and_a_concurrent_session_goes_on(swarm, reference) -> None:
    server, remote, client_t = swarm
    embeds = torch.randn(1, 6, HIDDEN)
    expected = hidden_states(reference, embeds)[10]
    good = await remote().open_inference(max_length=8, batch=1)
    first = await good.step(embeds[:, :3])

    bad = await remote().open_inference(max_length=4, batch=1)
    await bad.step(torch.randn(1, 3, HIDDEN))
    with pytest.raises(PetalError, match="max_length") as e:
        await bad.step(torch.randn(1, 2, HIDDEN))
    assert e.value.code == "max_length"
    with pytest.raises(PetalError) as e:  # wrong hidden size, the stream stays usable
        await bad.step(torch.randn(1, 1, HIDDEN + 1))
    assert e.value.code == "wrong_shape"
    with pytest.raises(PetalError) as e:  # wrong batch for the session
        await bad.step(torch.randn(2, 1, HIDDEN))
    assert e.value.code == "wrong_shape" and "batch" in e.value.message
    assert (await bad.step(torch.randn(1, 1, HIDDEN))).shape == (1, 1, HIDDEN)  # still usable
    await bad.close()

    with pytest.raises(PetalError) as e:
        await remote(5, 12).forward(embeds)
    assert e.value.code == "unknown_block" and "[0, 10)" in e.value.message
    with pytest.raises(PetalError) as e:
        await remote(5, 12).open_inference(max_length=4, batch=1)
    assert e.value.code == "unknown_block"
    with pytest.raises(PetalError) as e:
        await remote().forward(torch.randn(1, 2, HIDDEN * 2))
    assert e.value.code == "wrong_shape" and str(HIDDEN) in e.value.message
    with pytest.raises(PetalError) as e:
        await remote().forward(torch.randn(5, 2, HIDDEN))  # batch over max_batch 4
    assert e.value.code == "wrong_shape"

    peer = PeerAddr("server")
    header = {"model": server.model, "fingerprint": server.fingerprint, "start": 0, "end": 10}
    huge = {"dtype": "float32", "shape": [1, 10**7, HIDDEN], "codec": "none", "data": b"\0" * 16}
    garbage = [
        {**header, "hidden": huge},  # oversize: refused before allocating
        {**header, "hidden": {"dtype": "float32", "shape": [1, 2, HIDDEN], "codec": "none", "data": b"12"}},
        {**header, "hidden": "not a tensor"},
        {**header, "start": "zero", "hidden": encode_tensor(embeds)},
        {**header, "model": "other", "hidden": encode_tensor(embeds)},
        {**header, "fingerprint": "0" * 16, "hidden": encode_tensor(embeds)},
        {**header, "hidden": encode_tensor(embeds), "mask": encode_tensor(torch.ones(1, 99, dtype=torch.int64))},
        {**header, "hidden": encode_tensor(embeds), "codec": "zip"},
        {**header, "hidden": encode_tensor(torch.full((1, 2, HIDDEN), float("nan")))},
        [1, 2, 3],
        None,
    ]
    for msg in garbage:
        reply = await client_t.call(peer, FORWARD_PROTOCOL, msg, timeout=10)
        assert isinstance(reply, dict) and set(reply) == {"error"}, msg
        err = PetalError.from_wire(reply["error"])
        assert err.code in {"too_large", "bad_tensor", "bad_frame", "bad_request", "unknown_block", "wrong_shape"}
    huge_reply = await client_t.call(peer, FORWARD_PROTOCOL, garbage[0], timeout=10)
    assert huge_reply["error"]["code"] == "too_large"

    # garbage as the first inference message, then garbage steps on an open stream
    stream = await client_t.open_stream(peer, INFERENCE_PROTOCOL)
    await stream.send({"model": server.model, "start": 0, "end": 10, "max_length": "many", "batch": 1})
    assert (await stream.recv(timeout=10))["error"]["code"] == "bad_frame"
    stream = await client_t.open_stream(peer, INFERENCE_PROTOCOL)
    await stream.send({**header, "max_length": 4, "batch": 1})
    assert (await stream.recv(timeout=10))["ok"] is True
    for step in ({"hidden": 1}, {"hidden": encode_tensor(torch.randn(1, 1, HIDDEN)), "position": 3}, "x"):
        await stream.send(step)
        assert "error" in await stream.recv(timeout=10)
    await stream.close()

    # a corrupt frame resets only that stream (the transport's rule); the server goes on
    stream = await client_t.open_stream(peer, INFERENCE_PROTOCOL)
    stream._send_bytes(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
    with pytest.raises(StreamReset):
        await stream.recv(timeout=10)

    rest = torch.cat([first] + [await good.step(embeds[:, i : i + 1]) for i in range(3, 6)], dim=1)
    assert close(rest, expected)
    await good.close()
    await eventually(lambda: server.pool.free_units == server.pool.units)  # every cache went back


async def test_budget_exhaustion_is_busy_then_freed(swarm) -> None:
    _, remote, _ = swarm
    s1 = await remote().open_inference(max_length=64, batch=2)  # the whole budget: 10 blocks x 2 x 64
    assert (await remote().info()).cache_tokens_left == 0
    with pytest.raises(PetalError) as e:
        await remote().open_inference(max_length=8, batch=1)
    assert e.value.code == "busy"
    with pytest.raises(PetalError) as e:  # more than the whole budget: the caller's mistake, at once, saying so
        await remote().open_inference(max_length=64, batch=3)
    assert e.value.code == "too_large" and "whole KV budget of 1280" in e.value.message
    waiter = asyncio.ensure_future(remote(0, 5).open_inference(max_length=8, batch=1))
    await asyncio.sleep(0.05)
    await s1.close()  # frees the budget while the waiter waits
    s2 = await waiter
    assert (await s2.step(torch.randn(1, 2, HIDDEN))).shape == (1, 2, HIDDEN)
    await s2.close()


async def test_replies_parse_with_the_schema_that_writes_them(swarm) -> None:
    """One schema per wire thing: each raw reply of a real server parses with its `from_wire` and is exactly what
    that type's `to_wire` writes (info, forward, backward, open, steps computed, pushed, taken from a push and
    skipped, the push ack), and its DHT record reads back with `ServerRecord`."""
    server, _, client_t = swarm
    peer = PeerAddr("server")
    header = {"model": server.model, "fingerprint": server.fingerprint, "start": 0, "end": 10}
    x = encode_tensor(torch.randn(1, 2, HIDDEN))

    def schema(kind, raw):
        parsed = kind.from_wire(raw)
        assert parsed.to_wire() == raw, kind.__name__
        return parsed

    info = schema(InfoReply, await client_t.call(peer, INFO_PROTOCOL, {"model": server.model}, timeout=10))
    assert info == server.info() and info.push is True and "none" in info.codecs
    fwd = schema(ForwardReply, await client_t.call(peer, FORWARD_PROTOCOL, {**header, "hidden": x}, timeout=10))
    assert decode_reply_tensor(fwd.hidden, "hidden", shape=(1, 2, HIDDEN)).isfinite().all()
    request = {**header, "hidden": x, "grad": x, "prompts": encode_tensor(torch.randn(10, 1, 1, HIDDEN))}
    bwd = schema(BackwardReply, await client_t.call(peer, BACKWARD_PROTOCOL, request, timeout=10))
    assert bwd.grad_prompts is not None and bwd.grad_lora is None
    decode_reply_tensor(bwd.grad_prompts, "grad_prompts", shape=(10, 1, 1, HIDDEN))

    a = await client_t.open_stream(peer, INFERENCE_PROTOCOL)
    b = await client_t.open_stream(peer, INFERENCE_PROTOCOL)
    opened = []
    for stream in (a, b):
        await stream.send({**header, "max_length": 8, "batch": 1, "push": True})
        opened.append(schema(OpenReply, await stream.recv(timeout=10)))
    assert all(o.push and o.session is not None and o.max_length == 8 for o in opened)
    session_b = opened[1].session
    await a.send({"step": 0, "hidden": x, "push_to": {"peer": "server", "session": session_b}})
    step = schema(StepReply, await a.recv(timeout=10))
    assert (step.position, step.pushed, step.skipped) == (2, True, False)
    await b.send({"step": 0, "tokens": 2, "push_from": "server"})  # takes a's output, pushed above
    taken = schema(StepReply, await b.recv(timeout=10))
    assert taken.position == 2 and taken.pushed is None and taken.hidden is not None
    await b.send({"step": 1, "tokens": 1, "push_from": "server"})  # no push comes: the client's input wins
    await b.send({"step": 1, "hidden": encode_tensor(torch.randn(1, 1, HIDDEN))})
    skipped = schema(StepReply, await b.recv(timeout=10))
    assert skipped == StepReply(2, skipped=True)
    assert schema(StepReply, await b.recv(timeout=10)).position == 3
    push = await client_t.open_stream(peer, PUSH_PROTOCOL)
    await push.send({"session": session_b, "step": 2, "hidden": encode_tensor(torch.randn(1, 1, HIDDEN))})
    assert schema(PushAck, await push.recv(timeout=10)) == PushAck()
    for stream in (push, a, b):
        await stream.close()
    await eventually(lambda: server.pool.free_units == server.pool.units)
    record = ServerRecord.from_value(server.record("online"), "server")  # the DHT value too, "q" and "fp" included
    assert record.to_value() == server.record("online") and {"q", "fp"} <= set(server.record("online"))
    assert (record.quant, record.fingerprint, record.start, record.end) == ("none", server.fingerprint, 0, 10)


def test_choose_span_picks_the_weakest_window() -> None:
    def rec(start: int, end: int, tp: float, state: str = "online") -> dict:
        return ServerRecord(("/ip4/1.2.3.4/tcp/1",), start, end, state, tp, 100, "float32", 1).to_value()

    entries: dict[int, list] = {b: [rec(0, 10, 50.0)] for b in range(10)}
    entries.update({b: [rec(10, 20, 20.0)] for b in range(10, 20)})
    assert choose_span(entries, 10, 30) == (20, 30)  # blocks 20..29 have nobody
    entries.update({b: [rec(20, 30, 30.0)] for b in range(20, 30)})
    assert choose_span(entries, 10, 30) == (10, 20)
    entries.update({b: [rec(10, 20, 20.0, "offline")] for b in range(10, 20)})
    assert choose_span(entries, 5, 30) == (10, 15)  # offline servers count for nothing; earliest tie wins
    entries[12] = [{"garbage": True}]
    assert choose_span(entries, 40, 30) == (0, 30)


async def test_kv_pool_first_fit_and_coalescing() -> None:
    pool = KVPool(100, kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    a = pool.try_allocate(2, 1, 20)
    b = pool.try_allocate(3, 1, 20)
    assert a is not None and b is not None and pool.free_units == 0 and pool.try_allocate(1, 1, 1) is None
    a.cache.keys[1].fill_(1.0)
    assert b.cache.keys[0].abs().sum() == 0  # views do not overlap
    pool.free(a)
    pool.free(a)  # idempotent
    assert pool.free_units == 40 and pool.try_allocate(1, 1, 41) is None
    pool.free(b)
    assert pool.try_allocate(1, 1, 100) is not None  # ranges merged back into one


async def test_compute_worker_priority_and_bound() -> None:
    worker = ComputeWorker(max_queue=2)
    gate, order = threading.Event(), []
    try:
        blocker = worker.submit(1, gate.wait, 10)
        await asyncio.sleep(0.05)  # the blocker is running; the next two queue up
        slow = worker.submit(1, order.append, "training")
        fast = worker.submit(0, order.append, "inference")
        with pytest.raises(PetalError) as e:
            worker.submit(0, order.append, "overflow")
        assert e.value.code == "busy"
        gate.set()
        await asyncio.gather(asyncio.wrap_future(blocker), asyncio.wrap_future(slow), asyncio.wrap_future(fast))
        assert order == ["inference", "training"]
    finally:
        gate.set()
        worker.stop()


async def test_malformed_reply_is_the_servers_fault(swarm) -> None:
    """A server that answers with garbage is reported as ``bad_reply``, which the router treats as a faulty server.

    (It was a WireError, whose code ``bad_frame`` also names a caller's malformed request; ``bad_reply`` keeps the two
    apart so that a garbage reply bans the server and a caller's bad frame never does.)"""
    _, _, client_t = swarm
    network = client_t.network
    liar = MemoryTransport(network, "liar")
    await liar.start()

    async def lie(stream) -> None:
        await stream.recv()
        await stream.send({"hidden": {"dtype": "float32", "shape": [9], "codec": "none", "data": b"\0" * 36}})

    liar.set_handler(FORWARD_PROTOCOL, lie)
    try:
        span = RemoteSpan(client_t, PeerAddr("liar"), "m", "f", 0, 1, "none")
        with pytest.raises(PetalError) as caught:
            await span.forward(torch.randn(1, 2, HIDDEN))
        assert caught.value.code == "bad_reply" and is_server_fault(caught.value)
    finally:
        await liar.stop()


async def test_bloom_forward_and_inference(tmp_path: Path) -> None:
    """The server is family-agnostic: a tiny BLOOM (ALiBi, no rotary) matches transformers too."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(6)
    BloomForCausalLM(
        BloomConfig(hidden_size=32, n_head=4, n_layer=6, vocab_size=64, initializer_range=0.1)
    ).save_pretrained(tmp_path / "bloom")
    ref = BloomForCausalLM.from_pretrained(tmp_path / "bloom").eval()
    info = open_model(tmp_path / "bloom")
    network = MemoryNetwork()
    server_t, client_t = MemoryTransport(network, "s"), MemoryTransport(network, "c")
    await server_t.start()
    await client_t.start()
    server = BlockServer(
        load_span(info, 1, 5),
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=6,
        transport=server_t,
        settings=ServeSettings(max_length=16, max_cache_tokens=64),
    )
    await server.start()
    try:
        remote = RemoteSpan(client_t, PeerAddr("s"), info.name, info.fingerprint, 1, 5, "none")
        embeds = torch.randn(2, 5, 32)
        hs = ref(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        assert close(await remote.forward(hs[1]), hs[5])
        async with await remote.open_inference(8, 2) as session:
            out = torch.cat([await session.step(hs[1][:, :2]), await session.step(hs[1][:, 2:])], dim=1)
        assert close(out, hs[5])
    finally:
        await server.stop()
        await client_t.stop()
        await server_t.stop()


async def test_announcements_follow_the_free_cache(model_dir: Path) -> None:
    """Under every hosted block key and the models key; re-announced when the free KV budget moves; withdrawn."""
    info = open_model(model_dir)
    network = MemoryNetwork()
    server_t, client_t = MemoryTransport(network, "s"), MemoryTransport(network, "c")
    await server_t.start()
    await client_t.start()
    announced: list[tuple[str, dict]] = []
    withdrawn: list[str] = []

    async def announce(key: str, value: dict) -> None:
        announced.append((key, value))

    async def withdraw(key: str) -> None:
        withdrawn.append(key)

    settings = ServeSettings(max_length=16, max_cache_tokens=4 * 16, refresh_period=0.02)
    server = BlockServer(
        load_span(info, 4, 8),
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=LAYERS,
        transport=server_t,
        settings=settings,
        announce=announce,
        withdraw=withdraw,
        throughput=12.5,
    )
    await server.start()
    try:
        keys = {k for k, _ in announced}
        assert keys == {f"{info.name}.{b}" for b in range(4, 8)} | {"_models"}
        value = ServerRecord.from_value(announced[0][1])
        assert (value.start, value.end, value.state, value.cache_tokens_left, value.throughput) == (
            4,
            8,
            "online",
            16,
            12.5,
        )
        remote = RemoteSpan(client_t, PeerAddr("s"), info.name, info.fingerprint, 4, 8)
        session = await remote.open_inference(8, 1)

        def cache_left() -> int:
            return [v for k, v in announced if k != "_models"][-1]["c"]

        await eventually(lambda: cache_left() == 8)
        await session.close()
        await eventually(lambda: cache_left() == 16)
    finally:
        await server.stop()
        await client_t.stop()
        await server_t.stop()
    assert sorted(withdrawn) == sorted(f"{info.name}.{b}" for b in range(4, 8))
