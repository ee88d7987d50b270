"""Server-to-server push of inference steps (paper §3.2): one pass along the chain per step, exact failover.

In-process tests use real BlockServers on MemoryTransports (real frame encoding) and an in-memory DHT, as in
tests/unit/daemon/test_session.py (tests/support/swarms.py); the last test runs real petald daemons over libp2p
(tests/support/daemons.py).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from petal.daemon.net.transport import PeerAddr
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.routing.session import InferenceSession
from petal.kernels.span import Span
from petal.protocol.errors import PetalError
from petal.protocol.messages import PUSH_PROTOCOL, check_reply, parse_push, parse_step
from petal.protocol.tensors import encode_tensor
from tests.support.daemons import Swarm
from tests.support.swarms import MODEL, Client, LocalSwarm, embed, logits
from tests.support.tinymodels import tiny_llama

H = 64  # tiny_llama's hidden size


@pytest.fixture
def model():
    return tiny_llama(num_hidden_layers=6)


@pytest.fixture
async def swarm(model):
    s = LocalSwarm(model)
    await s.start()
    yield s
    await s.close()


async def run_steps(swarm, model, ids, *, push, codec="none", prompt_len=5):
    """Prefill `prompt_len` tokens, then one token at a time; returns (logits, pushes, per hop: peers it stopped
    pushing to)."""
    async with InferenceSession(swarm.router, MODEL, max_length=16, batch=ids.shape[0], codec=codec, push=push) as s:
        with torch.no_grad():
            out = [await s.step(embed(model, ids[:, :prompt_len]))]
            for i in range(prompt_len, ids.shape[1]):
                out.append(await s.step(embed(model, ids[:, i : i + 1])))
            assert s.failovers == 0
            return logits(model, torch.cat(out, dim=1)), s.pushes, [link.no_push_to for link in s._links]


async def greedy(swarm, model, prompt, n, *, push=True, kill_after=None, codec="q8"):
    tokens = []
    async with InferenceSession(swarm.router, MODEL, max_length=prompt.shape[1] + n, codec=codec, push=push) as s:
        with torch.no_grad():
            h = await s.step(embed(model, prompt))
            for i in range(n):
                nxt = logits(model, h[:, -1]).argmax(-1)
                tokens.append(int(nxt))
                if kill_after == i + 1:
                    await swarm.kill(next(hop.peer_id for hop in s.chain if hop.start <= 2 < hop.end))
                if i + 1 < n:
                    h = await s.step(embed(model, nxt[:, None]))
        return tokens, s.failovers, s.pushes


async def test_push_equals_client_relay_equals_transformers(swarm, model):
    for a, b in [(0, 2), (2, 4), (4, 6)]:
        await swarm.add(a, b)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    got_push, pushes, _ = await run_steps(swarm, model, ids, push=True)
    got_plain, no_pushes, _ = await run_steps(swarm, model, ids, push=False)
    assert pushes == 2 * 5 and no_pushes == 0  # 2 links x (1 prefill + 4 decode steps)
    torch.testing.assert_close(got_push, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_push, got_plain, atol=1e-5, rtol=0)
    prompt = ids[:1, :4]
    assert (await greedy(swarm, model, prompt, 12, push=True))[0] == (
        await greedy(swarm, model, prompt, 12, push=False)
    )[0]


async def test_failover_with_push_gives_identical_tokens(swarm, model):
    await swarm.add(0, 2)
    await swarm.add(2, 4)
    await swarm.add(2, 4)
    await swarm.add(4, 6)
    prompt = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    want, failovers, pushes = await greedy(swarm, model, prompt, 24)
    assert failovers == 0 and pushes == 2 * 24
    for _ in range(2):
        got, failovers, pushes = await greedy(swarm, model, prompt, 24, kill_after=8)
        assert failovers == 1 and got == want
        assert pushes > 2 * 8  # pushing went on after the replacement
        await swarm.add(2, 4)


async def test_push_refused_falls_back_to_the_client(swarm, model):
    for a, b in [(0, 2), (2, 4), (4, 6)]:
        await swarm.add(a, b)
    last = next(p for p, (srv, _, _) in swarm.servers.items() if srv.span.start == 4)
    swarm.servers[last][1]._handlers.pop(PUSH_PROTOCOL)  # the last hop cannot be pushed to (ProtocolNotSupported)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    got, pushes, stopped = await run_steps(swarm, model, ids, push=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert pushes == 5  # only hop 0 -> hop 1 pushed; hop 1 -> hop 2 failed once and was not tried again
    assert stopped == [set(), {last}, set()]


async def test_push_sent_but_not_acked_is_reported_and_the_client_sends_the_input(swarm, model):
    """A hop replies once its push is sent, before the ack (one round trip less on long links). When the next hop
    then takes the push but never delivers or acks it, the pusher tells the client (a PushFailed notice); the client,
    waiting for the next hop, sends that input itself: the same logits, no failover and no step timeout."""
    for a, b in [(0, 2), (2, 4), (4, 6)]:
        await swarm.add(a, b)
    last = next(p for p, (srv, _, _) in swarm.servers.items() if srv.span.start == 4)
    taken: list[object] = []

    async def swallow(stream) -> None:  # reads pushes, acks none of them, delivers none
        while True:
            try:
                taken.append(await stream.recv())
            except Exception:  # noqa: BLE001 - the pusher gave up and reset the stream
                return
            await stream.send({"error": {"code": "busy", "message": "not now"}})

    swarm.servers[last][1]._handlers[PUSH_PROTOCOL] = swallow
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
    async with InferenceSession(swarm.router, MODEL, max_length=16, codec="none", push=True, step_timeout=30) as s:
        with torch.no_grad():
            out = [await s.step(embed(model, ids[:, :5]))]
            for i in range(5, ids.shape[1]):
                out.append(await s.step(embed(model, ids[:, i : i + 1])))
        assert s.failovers == 0
        stopped = [link.no_push_to for link in s._links]
    torch.testing.assert_close(logits(model, torch.cat(out, dim=1)), want, atol=1e-4, rtol=0)
    assert len(taken) == 1  # the first push reached the last hop's (broken) handler; the client stopped asking
    assert stopped == [set(), {last}, set()]


async def open_push_session(swarm, peer, start, end, *, push=True, batch=1):
    server = swarm.servers[peer][0]
    span = RemoteSpan(swarm.client_transport, PeerAddr(peer), MODEL, "FP", start, end, codec="none")
    assert server.info().push is True
    return await span.open_inference(16, batch, push=push)


async def test_bad_pushes_get_errors_and_sessions_go_on(swarm, model):
    first = await swarm.add(0, 3)
    second = await swarm.add(3, 6)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
    target = await open_push_session(swarm, second, 3, 6)
    closed_to_push = await open_push_session(swarm, second, 3, 6, push=False)
    assert target.accepts_push and target.session_id and not closed_to_push.accepts_push
    me = swarm.client_transport.peer_id
    stream = await swarm.client_transport.open_stream(PeerAddr(second), PUSH_PROTOCOL)

    async def push(msg):
        await stream.send(msg)
        return await stream.recv(timeout=10)

    def code(reply):
        with pytest.raises(PetalError) as e:
            check_reply(reply, "ok")
        return e.value.code

    ok = encode_tensor(torch.randn(1, 1, H), "none")
    sid = target.session_id
    assert code(await push({"session": "0" * 32, "step": 0, "hidden": ok})) == "not_found"
    assert code(await push({"session": closed_to_push.session_id, "step": 0, "hidden": ok})) == "not_found"
    assert code(await push({"session": "NOT-HEX", "step": 0, "hidden": ok})) == "bad_frame"
    assert code(await push(["not", "a", "map"])) == "bad_frame"
    assert code(await push({"session": sid, "step": -1, "hidden": ok})) == "bad_request"
    assert (
        code(await push({"session": sid, "step": 0, "hidden": encode_tensor(torch.randn(1, 1, H + 1))}))
        == "wrong_shape"
    )
    assert code(await push({"session": sid, "step": 0, "hidden": encode_tensor(torch.randn(2, 1, H))})) == "wrong_shape"
    too_long = encode_tensor(torch.randn(1, 17, H), "none")  # the session was opened for 16 tokens
    assert code(await push({"session": sid, "step": 0, "hidden": too_long})) == "wrong_shape"
    nan = torch.full((1, 1, H), float("nan"))
    assert code(await push({"session": sid, "step": 0, "hidden": encode_tensor(nan, "none")})) == "bad_tensor"
    # a bounded buffer: PUSH_WINDOW early pushes are kept, the next is refused
    for s in range(4):
        check_reply(await push({"session": sid, "step": 10 + s, "hidden": ok}), "ok")
    assert code(await push({"session": sid, "step": 20, "hidden": ok})) == "busy"

    # a step that waits for a push from `me`: a push from another peer or of the wrong length is refused at once
    x = embed(model, ids[:, :5]).detach()
    inbox = swarm.servers[second][0]._inboxes[sid]

    async def waiting(step):
        await target.send_step(
            None, step=step, tokens=x.shape[1] if step == 30 else 1, push_from="someone-else" if step == 30 else me
        )
        for _ in range(1000):
            if inbox._waiting is not None:
                return
            await asyncio.sleep(0.005)

    await waiting(30)
    assert not inbox._items  # the waiting step dropped the early pushes for steps before it
    assert code(await push({"session": sid, "step": 30, "hidden": encode_tensor(x, "none")})) == "bad_request"
    await target.send_step(x)  # the client's own input supersedes the waiting step
    assert (await target.recv_step(tuple(x.shape))).hidden is None  # skipped
    out = (await target.recv_step(tuple(x.shape))).hidden
    span = Span.from_model(model, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(out, span(x), atol=1e-4, rtol=0)
    await waiting(31)
    assert code(await push({"session": sid, "step": 31, "hidden": encode_tensor(x, "none")})) == "wrong_shape"
    y = torch.randn(1, 1, H)
    check_reply(await push({"session": sid, "step": 31, "hidden": encode_tensor(y, "none")}), "ok")
    out = (await target.recv_step((1, 1, H))).hidden
    with torch.no_grad():  # the pushed input is what the server ran
        torch.testing.assert_close(out, span(torch.cat([x, y], dim=1))[:, -1:], atol=1e-4, rtol=0)
    assert target.position == 6
    assert code(await push({"session": sid, "step": 31, "hidden": ok})) == "bad_request"  # already ran
    await stream.close()
    await target.close()
    await closed_to_push.close()

    # the servers are unharmed: a fresh session with push gives the exact output
    got, pushes, _ = await run_steps(swarm, model, ids, push=True)
    assert pushes == 5
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    del first


def test_step_and_push_messages_validate() -> None:
    from petal.protocol.messages import ServedSpan

    served = ServedSpan("m", "f", 0, 4, hidden_size=8, max_batch=2, max_length=16)
    ctx = dict(blocks=4, batch=1, max_length=16, length=3)
    target = {"peer": "Qm", "addrs": ["/ip4/127.0.0.1/tcp/1"], "session": "a" * 32}
    step = parse_step({"push_from": "Qm", "step": 4, "tokens": 2, "push_to": target}, served, **ctx)
    assert step.hidden is None and step.tokens == 2 and step.position == 3 and step.push_to.session == "a" * 32
    for bad, want in [
        ({"push_from": "Qm", "tokens": 2}, "bad_frame"),  # no step number
        ({"push_from": "Qm", "step": 1, "tokens": 14}, "max_length"),
        ({"push_from": "Qm", "step": 1}, "bad_frame"),  # no tokens
        ({"push_from": "", "step": 1, "tokens": 1}, "bad_frame"),
        ({"hidden": encode_tensor(torch.randn(1, 1, 8)), "push_to": target}, "bad_frame"),  # push_to needs step
        ({"push_from": "Qm", "step": 1, "tokens": 1, "push_to": {**target, "session": "x"}}, "bad_frame"),
        ({"push_from": "Qm", "step": 1, "tokens": 1, "push_to": {**target, "addrs": ["a"] * 17}}, "bad_frame"),
        ({"push_from": "Qm", "step": True, "tokens": 1}, "bad_frame"),
    ]:
        with pytest.raises(PetalError) as e:
            parse_step(bad, served, **ctx)
        assert e.value.code == want, bad
    p = parse_push({"session": "b" * 32, "step": 0, "hidden": encode_tensor(torch.randn(2, 3, 8))}, served)
    assert p.hidden.shape == (2, 3, 8)
    with pytest.raises(PetalError) as e:
        parse_push({"session": "b" * 32, "step": 0, "hidden": encode_tensor(torch.randn(3, 1, 8))}, served)
    assert e.value.code == "wrong_shape"


# --- real daemons -----------------------------------------------------------------------------------------------

DAEMON_MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def model_dir():
    root = Path(tempfile.mkdtemp(prefix="petal-pm-", dir="/tmp"))
    m = tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64)
    m.save_pretrained(root / DAEMON_MODEL, safe_serialization=True)
    yield root / DAEMON_MODEL, m
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon_swarm():
    root = Path(tempfile.mkdtemp(prefix="petal-p-", dir="/tmp"))
    s = Swarm(root)
    yield s
    s.close()
    shutil.rmtree(root, ignore_errors=True)


async def daemon_greedy(client, m, prompt, n, *, push, codec, kill=None):
    tokens = []
    async with InferenceSession(
        client.router, DAEMON_MODEL, max_length=prompt.shape[1] + n, codec=codec, push=push
    ) as s:
        with torch.no_grad():
            h = await s.step(m.model.embed_tokens(prompt))
            for i in range(n):
                nxt = m.lm_head(m.model.norm(h[:, -1])).argmax(-1)
                tokens.append(int(nxt))
                if kill is not None and i + 1 == n // 3:
                    kill(s)
                if i + 1 < n:
                    h = await s.step(m.model.embed_tokens(nxt[:, None]))
        return tokens, s.failovers, s.pushes


async def test_push_over_real_daemons_with_a_sigkill(daemon_swarm, model_dir):
    path, m = model_dir
    serve = ("--serve", str(path))
    t0 = time.monotonic()
    boot = daemon_swarm.start_bootstrap("s0", *serve, "--blocks", "0:10")
    addr = boot.address
    with ThreadPoolExecutor(max_workers=3) as pool:
        daemons = list(
            pool.map(
                lambda nb: daemon_swarm.make(nb[0], "--initial-peer", addr, *serve, "--blocks", nb[1]).start(),
                [("m0", "10:20"), ("m1", "10:20"), ("s3", "20:30")],
            )
        )
    middle = {d.status()["peer_id"]: d for d in daemons[:2]}
    client = await Client().start(boot.status()["dht_port"])
    print(f"4 serving daemons up in {time.monotonic() - t0:.1f} s")
    try:
        prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(7))
        n = 12
        with torch.no_grad():
            want = m.generate(prompt, max_new_tokens=n, do_sample=False)[0, 5:].tolist()
        t0 = time.monotonic()
        got, _, pushes = await daemon_greedy(client, m, prompt, n, push=True, codec="none")
        print(f"first generation (routing, opening): {time.monotonic() - t0:.1f} s")
        assert got == want and pushes == 2 * n
        plain, _, no_pushes = await daemon_greedy(client, m, prompt, n, push=False, codec="none")
        assert plain == want and no_pushes == 0
        q8, _, _ = await daemon_greedy(client, m, prompt, n, push=True, codec="q8")
        q8_plain, _, _ = await daemon_greedy(client, m, prompt, n, push=False, codec="q8")
        assert q8 == q8_plain

        def kill_middle(session):
            victim = next(h.peer_id for h in session.chain if h.start <= 10 < h.end)
            middle.pop(victim).kill()  # SIGKILL: the push stream into it and its own stream drop mid-session

        t0 = time.monotonic()
        got, failovers, pushes = await daemon_greedy(client, m, prompt, n, push=True, codec="q8", kill=kill_middle)
        print(f"generation with a SIGKILL and failover: {time.monotonic() - t0:.1f} s")
        assert failovers == 1 and got == q8
        assert pushes > 2 * (n // 3)
    finally:
        await client.stop()


async def test_send_after_a_malformed_frame_keeps_the_libp2p_thread_alive():
    """Regression: a peer's malformed frame resets the stream in the trio thread; a send (or close) before the
    asyncio side noticed used to raise inside a trio callback and end the whole transport (every push stream and
    session with it). Now that send fails with StreamReset and the transport goes on."""
    from petal.daemon.identity import Identity
    from petal.daemon.net.p2p import Libp2pTransport
    from petal.daemon.net.transport import StreamReset

    a = Libp2pTransport(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"])
    b = Libp2pTransport(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"])
    await a.start()
    await b.start()
    done = asyncio.Event()

    async def garbage(stream):
        await stream.recv()
        await stream._send_raw(b"\xff" * 8 + b"garbage")  # declares a 4 GiB frame
        await done.wait()

    async def echo(stream):
        await stream.send(await stream.recv())

    b.set_handler("/test/garbage/1", garbage)
    b.set_handler("/test/echo/1", echo)
    try:
        peer = PeerAddr(b.peer_id, tuple(b.listen_addrs))
        s = await a.open_stream(peer, "/test/garbage/1")
        await s.send({"hi": 1})
        for _ in range(200):  # until a's pump has reset the stream (the asyncio side has not read it yet)
            if not s._inbox.empty():
                break
            await asyncio.sleep(0.01)
        with pytest.raises(StreamReset):
            await asyncio.wait_for(s.send({"again": 1}), 10)
        await s.close()
        assert await a.call(peer, "/test/echo/1", {"still": "alive"}, timeout=10) == {"still": "alive"}
    finally:
        done.set()
        await a.stop()
        await b.stop()
